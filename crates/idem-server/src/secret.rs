//! The principal secret: the HMAC key principals are hashed with before they become part
//! of a record id.
//!
//! It must be the same for every process that shares a store, and across restarts, or a
//! retry after a restart would name a different record and execute again. Where it comes
//! from:
//!
//! 1. `IDEM_PRINCIPAL_SECRET`, else `principal_secret` in the configuration;
//! 2. otherwise, with the memory store: random bytes for this process (its records die
//!    with it anyway);
//! 3. with the embedded store: a random secret generated once and kept in a file next to
//!    the database (`idem.db.secret`, mode 0600), read back on every start;
//! 4. with a shared store, nothing: a missing secret is a configuration error (replicas
//!    must agree), caught when the configuration is validated.

use std::fs::OpenOptions;
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use crate::store::Sharing;

/// Why the secret cannot be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SecretError {
    /// The secret file cannot be read or written.
    #[error("principal secret file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The secret file exists but holds no secret.
    #[error("principal secret file {path} is empty")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A shared store and no configured secret.
    #[error("a shared store needs principal_secret in the configuration or IDEM_PRINCIPAL_SECRET")]
    Missing,
    /// The system has no randomness to offer.
    #[error("no randomness for a principal secret: {0}")]
    Random(String),
}

/// The file the embedded store's secret is kept in: the database path with `.secret`
/// appended.
pub fn secret_path(database: &Path) -> PathBuf {
    let mut name = database.as_os_str().to_owned();
    name.push(".secret");
    PathBuf::from(name)
}

/// The secret to run with: the configured one, or one suited to the store (see the
/// [module docs](self)). May create the embedded store's secret file.
pub fn resolve(configured: Option<&str>, sharing: &Sharing) -> Result<Vec<u8>, SecretError> {
    if let Some(secret) = configured {
        return Ok(secret.as_bytes().to_vec());
    }
    match sharing {
        Sharing::Process => Ok(random_hex()?.into_bytes()),
        Sharing::File(database) => load_or_create(&secret_path(database)),
        Sharing::Shared => Err(SecretError::Missing),
    }
}

/// The secret for tools that must not create one (`idem keys`): the configured one, or
/// the embedded store's existing file.
pub fn existing(configured: Option<&str>, sharing: &Sharing) -> Result<Vec<u8>, SecretError> {
    if let Some(secret) = configured {
        return Ok(secret.as_bytes().to_vec());
    }
    match sharing {
        Sharing::File(database) => read(&secret_path(database)),
        _ => Err(SecretError::Missing),
    }
}

fn random_hex() -> Result<String, SecretError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| SecretError::Random(e.to_string()))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn read(path: &Path) -> Result<Vec<u8>, SecretError> {
    let text = std::fs::read_to_string(path).map_err(|source| SecretError::File {
        path: path.to_path_buf(),
        source,
    })?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(SecretError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(secret.as_bytes().to_vec())
}

fn load_or_create(path: &Path) -> Result<Vec<u8>, SecretError> {
    match read(path) {
        Err(SecretError::File { source, .. }) if source.kind() == ErrorKind::NotFound => {}
        other => return other,
    }
    let file_error = |source| SecretError::File {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(file_error)?;
    }
    let secret = random_hex()?;
    // Written to a private temporary file, then linked into place without replacing:
    // two processes starting at once end up with the same secret (the loser reads the
    // winner's), and no one ever reads a half-written file.
    let temp = path.with_extension(format!("secret.{}.tmp", std::process::id()));
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let written = options.open(&temp).and_then(|mut file| {
        file.write_all(secret.as_bytes())?;
        file.write_all(b"\n")?;
        file.sync_all()
    });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(file_error(e));
    }
    let linked = std::fs::hard_link(&temp, path);
    let _ = std::fs::remove_file(&temp);
    match linked {
        Ok(()) => Ok(secret.into_bytes()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read(path),
        Err(e) => Err(file_error(e)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn configured_secret_wins() {
        let s = resolve(Some("abc"), &Sharing::Shared).unwrap();
        assert_eq!(s, b"abc");
    }

    #[test]
    fn shared_store_without_secret_fails() {
        assert!(matches!(
            resolve(None, &Sharing::Shared),
            Err(SecretError::Missing)
        ));
    }

    #[test]
    fn memory_secrets_are_random() {
        let a = resolve(None, &Sharing::Process).unwrap();
        let b = resolve(None, &Sharing::Process).unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn embedded_secret_is_created_once_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("nested").join("idem.db");
        let sharing = Sharing::File(db.clone());
        assert!(existing(None, &sharing).is_err());
        let first = resolve(None, &sharing).unwrap();
        let again = resolve(None, &sharing).unwrap();
        assert_eq!(first, again);
        assert_eq!(existing(None, &sharing).unwrap(), first);
        let path = secret_path(&db);
        assert_eq!(path.file_name().unwrap(), "idem.db.secret");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(db.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("idem.db.secret")]);
    }
}
