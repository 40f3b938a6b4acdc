//! Where and how the store connects: the driver's configuration and the TLS parameters of
//! the URL, read as libpq reads them, for every connection the store opens (the pool's,
//! the notification listener's, the migrations').
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (the default) | when the server offers it | not checked |
//! | `require` | always | checked against `sslrootcert` when one is given, else not |
//! | `verify-ca` | always | signed by an authority of `sslrootcert` (required) |
//! | `verify-full` | always | signed by an authority of `sslrootcert` (or the system's), and issued for the host connected to |
//!
//! `sslrootcert` is a PEM file of trusted authorities, or `system` for the system's.
//! `sslcert` and `sslkey` (PEM files, together) present a client certificate. `allow` tries
//! TLS first (libpq tries plain first); both accept either.

use idem_core::Error;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Connection, Socket};

/// The TLS connector: rustls with the `tls` feature, none without.
#[cfg(feature = "tls")]
pub(crate) type Tls = tokio_postgres_rustls::MakeRustlsConnect;
/// The TLS connector: rustls with the `tls` feature, none without.
#[cfg(not(feature = "tls"))]
pub(crate) type Tls = tokio_postgres::NoTls;

/// A connection's stream, plain or TLS.
pub(crate) type Stream = <Tls as MakeTlsConnect<Socket>>::Stream;

/// The `sslmode` values.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Mode {
    Disable,
    #[default]
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

/// How the server's certificate is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Not at all: the connection is encrypted against eavesdroppers, not against a server
    /// that pretends.
    Nothing,
    /// Signed by a trusted authority, for whatever host.
    Chain,
    /// Signed by a trusted authority and issued for the host connected to.
    Full,
}

/// The TLS parameters of a URL.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsParameters {
    /// `sslmode`, when the query names it (else the driver's reading of the URL decides).
    pub(crate) mode: Option<Mode>,
    /// `sslrootcert`: a PEM file, or `system`.
    pub(crate) root_cert: Option<String>,
    /// `sslcert`: the client certificate chain (PEM).
    pub(crate) cert: Option<String>,
    /// `sslkey`: the client certificate's key (PEM).
    pub(crate) key: Option<String>,
}

impl TlsParameters {
    /// How the server's certificate is checked under these parameters.
    pub(crate) fn verify(&self) -> Result<Verify, Error> {
        let system = self.root_cert.as_deref() == Some("system");
        let mode = self.mode.unwrap_or_default();
        if system && mode != Mode::VerifyFull {
            // As libpq has it: the system's authorities vouch for a host name, never alone.
            return Err(invalid(
                "sslrootcert=system goes with sslmode=verify-full only: the system's \
                 authorities sign certificates for any host, so only the host name check \
                 makes them mean anything",
            ));
        }
        Ok(match mode {
            Mode::Disable | Mode::Prefer => Verify::Nothing,
            Mode::Require if self.root_cert.is_some() => Verify::Chain,
            Mode::Require => Verify::Nothing,
            Mode::VerifyCa if self.root_cert.is_none() => {
                return Err(invalid(
                    "sslmode=verify-ca needs sslrootcert=FILE: with the system's authorities, \
                     any certificate a public authority signed, for any host, would pass \
                     (verify-full checks the host too)",
                ));
            }
            Mode::VerifyCa => Verify::Chain,
            Mode::VerifyFull => Verify::Full,
        })
    }

    /// Whether the URL asks for anything only TLS can do.
    #[cfg(not(feature = "tls"))]
    fn needs_tls(&self) -> bool {
        matches!(
            self.mode,
            Some(Mode::Require | Mode::VerifyCa | Mode::VerifyFull)
        ) || self.root_cert.is_some()
            || self.cert.is_some()
            || self.key.is_some()
    }
}

pub(crate) fn invalid(reason: &str) -> Error {
    Error::InvalidRequest {
        reason: format!("invalid PostgreSQL URL: {reason}"),
    }
}

/// Takes the TLS parameters out of a `postgres://` URL's query: the URL left for the
/// driver, and the parameters. A URL in the key=value form is left to the driver whole
/// (it reads `sslmode=disable|prefer|require` there itself).
pub(crate) fn split(url: &str) -> Result<(String, TlsParameters), Error> {
    let mut parameters = TlsParameters::default();
    let Some((base, query)) = query_split(url) else {
        return Ok((url.to_owned(), parameters));
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (raw_name, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        // Names are percent-decoded too, as the driver decodes them: `ssl%6Dode` is sslmode.
        let name = decode(raw_name, "a parameter name")?;
        let name = name.as_str();
        let value = || decode(raw_value, name);
        match name {
            "sslmode" => {
                parameters.mode = Some(match value()?.as_str() {
                    "disable" => Mode::Disable,
                    "allow" | "prefer" => Mode::Prefer,
                    "require" => Mode::Require,
                    "verify-ca" => Mode::VerifyCa,
                    "verify-full" => Mode::VerifyFull,
                    other => {
                        return Err(invalid(&format!(
                            "sslmode must be disable, allow, prefer, require, verify-ca or \
                             verify-full, not {other:?}"
                        )));
                    }
                })
            }
            "sslrootcert" => parameters.root_cert = Some(non_empty(name, value()?)?),
            "sslcert" => parameters.cert = Some(non_empty(name, value()?)?),
            "sslkey" => parameters.key = Some(non_empty(name, value()?)?),
            "sslpassword" => {
                return Err(invalid(
                    "sslpassword is not supported: give sslkey a key file that is not encrypted",
                ));
            }
            // The driver's own (TLS negotiation, as PostgreSQL 17 has it).
            "sslnegotiation" => kept.push(pair),
            _ if name.starts_with("ssl") => {
                return Err(invalid(&format!("{name} is not supported")));
            }
            _ => kept.push(pair),
        }
    }
    if parameters.mode.is_none() && parameters.root_cert.as_deref() == Some("system") {
        // libpq's default with the system's authorities.
        parameters.mode = Some(Mode::VerifyFull);
    }
    if parameters.cert.is_some() != parameters.key.is_some() {
        return Err(invalid(
            "sslcert and sslkey go together: the certificate and its key",
        ));
    }
    let url = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((url, parameters))
}

fn decode(text: &str, what: &str) -> Result<String, Error> {
    percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .map(|v| v.into_owned())
        .map_err(|_| invalid(&format!("{what} is not UTF-8 once percent-decoded")))
}

/// A `postgres://` URL's part before its query and its query, found where the driver finds
/// them: the credentials run to the first `@` (a `?` in a password is the password's), the
/// query starts at the first `?` after them.
fn query_split(url: &str) -> Option<(&str, &str)> {
    let scheme = ["postgres://", "postgresql://"]
        .into_iter()
        .find(|scheme| url.starts_with(scheme))?;
    let rest = &url[scheme.len()..];
    let host_start = scheme.len() + rest.find('@').map_or(0, |at| at + 1);
    let at = host_start + url[host_start..].find('?')?;
    Some((&url[..at], &url[at + 1..]))
}

fn non_empty(name: &str, value: String) -> Result<String, Error> {
    if value.is_empty() {
        return Err(invalid(&format!("{name} is empty")));
    }
    Ok(value)
}

/// The server to connect to and the connector for it, from a URL.
#[derive(Clone)]
pub(crate) struct Target {
    pub(crate) config: tokio_postgres::Config,
    tls: Tls,
}

impl Target {
    pub(crate) fn parse(url: &str) -> Result<Self, Error> {
        let (driver_url, mut parameters) = split(url)?;
        let mut config: tokio_postgres::Config =
            driver_url.parse().map_err(|e| invalid(&format!("{e}")))?;
        if parameters.mode.is_none() {
            // The driver's reading: the key=value form's sslmode, or one the query split
            // did not see (a `?` inside the password), never weakened to the default.
            parameters.mode = Some(match config.get_ssl_mode() {
                SslMode::Disable => Mode::Disable,
                SslMode::Require => Mode::Require,
                _ => Mode::Prefer,
            });
        }
        config.ssl_mode(match parameters.mode.unwrap_or_default() {
            Mode::Disable => SslMode::Disable,
            Mode::Prefer => SslMode::Prefer,
            Mode::Require | Mode::VerifyCa | Mode::VerifyFull => SslMode::Require,
        });
        let tls = connector(&parameters)?;
        Ok(Self { config, tls })
    }

    /// Opens one connection.
    pub(crate) async fn connect(
        &self,
    ) -> Result<(Client, Connection<Socket, Stream>), tokio_postgres::Error> {
        self.config.connect(self.tls()).await
    }

    /// The connector, for a connection or a pool.
    #[allow(clippy::clone_on_copy)] // NoTls, without the `tls` feature, is Copy
    pub(crate) fn tls(&self) -> Tls {
        self.tls.clone()
    }
}

/// Checks a URL's TLS parameters as far as can be done without reading their files.
pub(crate) fn check(url: &str) -> Result<(), Error> {
    let (_, parameters) = split(url)?;
    parameters.verify()?;
    supported(&parameters)
}

#[cfg(feature = "tls")]
fn supported(_: &TlsParameters) -> Result<(), Error> {
    Ok(())
}

#[cfg(not(feature = "tls"))]
fn supported(parameters: &TlsParameters) -> Result<(), Error> {
    if parameters.needs_tls() {
        return Err(Error::InvalidRequest {
            reason: "the PostgreSQL URL asks for TLS (sslmode=require or stricter, or \
                     certificates), which this build leaves out: build idem-postgres with \
                     its `tls` feature"
                .into(),
        });
    }
    Ok(())
}

#[cfg(feature = "tls")]
fn connector(parameters: &TlsParameters) -> Result<Tls, Error> {
    crate::tls::connector(parameters)
}

#[cfg(not(feature = "tls"))]
fn connector(parameters: &TlsParameters) -> Result<Tls, Error> {
    parameters.verify()?;
    supported(parameters)?;
    Ok(tokio_postgres::NoTls)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// The reason of an `InvalidRequest`; a panic for any other error.
    pub(crate) fn reason(e: Error) -> String {
        match e {
            Error::InvalidRequest { reason } => reason,
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn tls_parameters_are_taken_out_of_the_url_and_the_rest_kept() {
        let (url, p) = split(
            "postgres://u@db:5432/d?application_name=gw&sslmode=verify-full\
             &sslrootcert=%2Fetc%2Fca%20bundle.pem&sslcert=/c.pem&sslkey=/k.pem&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(
            url,
            "postgres://u@db:5432/d?application_name=gw&connect_timeout=3"
        );
        assert_eq!(
            p,
            TlsParameters {
                mode: Some(Mode::VerifyFull),
                root_cert: Some("/etc/ca bundle.pem".into()),
                cert: Some("/c.pem".into()),
                key: Some("/k.pem".into()),
            }
        );
        let (url, p) = split("postgresql://u@db/d?sslmode=require").unwrap();
        assert_eq!(
            (url.as_str(), p.mode),
            ("postgresql://u@db/d", Some(Mode::Require))
        );
        let (url, p) = split("postgres://u:pa?sslmode=disable@db/d?sslmode=verify-full").unwrap();
        assert_eq!(
            (url.as_str(), p.mode),
            (
                "postgres://u:pa?sslmode=disable@db/d",
                Some(Mode::VerifyFull)
            )
        );
        // libpq's default mode with the system's authorities.
        let (_, p) = split("postgres://db/d?sslrootcert=system").unwrap();
        assert_eq!(p.mode, Some(Mode::VerifyFull));
        // Names are percent-decoded, as the driver decodes them.
        let (url, p) = split("postgres://u@db/d?ssl%6Dode=verify-full").unwrap();
        assert_eq!(
            (url.as_str(), p.mode),
            ("postgres://u@db/d", Some(Mode::VerifyFull))
        );
        let (url, p) = split("host=db sslmode=require").unwrap();
        assert_eq!(
            (url.as_str(), p),
            ("host=db sslmode=require", TlsParameters::default())
        );
    }

    #[test]
    fn each_mode_checks_what_libpq_checks() {
        let with = |mode, root: Option<&str>| TlsParameters {
            mode: Some(mode),
            root_cert: root.map(str::to_owned),
            ..TlsParameters::default()
        };
        let cases = [
            (with(Mode::Disable, None), Verify::Nothing),
            (with(Mode::Prefer, None), Verify::Nothing),
            (with(Mode::Prefer, Some("ca.pem")), Verify::Nothing),
            (with(Mode::Require, None), Verify::Nothing),
            (with(Mode::Require, Some("ca.pem")), Verify::Chain),
            (with(Mode::VerifyCa, Some("ca.pem")), Verify::Chain),
            (with(Mode::VerifyFull, None), Verify::Full),
            (with(Mode::VerifyFull, Some("system")), Verify::Full),
        ];
        for (parameters, verify) in cases {
            assert_eq!(parameters.verify().unwrap(), verify, "{parameters:?}");
        }
        assert!(reason(with(Mode::VerifyCa, None).verify().unwrap_err()).contains("sslrootcert"));
        for mode in [Mode::Disable, Mode::Prefer, Mode::Require, Mode::VerifyCa] {
            let got = reason(with(mode, Some("system")).verify().unwrap_err());
            assert!(got.contains("verify-full only"), "{mode:?}: {got}");
        }
    }

    #[test]
    fn bad_tls_parameters_are_refused_with_the_reason() {
        let cases = [
            (
                "postgres://db/d?sslmode=strict",
                "sslmode must be disable, allow",
            ),
            ("postgres://db/d?sslmode=", "not \"\""),
            ("postgres://db/d?sslrootcert=", "sslrootcert is empty"),
            (
                "postgres://db/d?sslcert=/c.pem",
                "sslcert and sslkey go together",
            ),
            (
                "postgres://db/d?sslkey=/k.pem",
                "sslcert and sslkey go together",
            ),
            (
                "postgres://db/d?sslpassword=x",
                "sslpassword is not supported",
            ),
            ("postgres://db/d?sslcrl=/crl.pem", "sslcrl is not supported"),
            ("postgres://db/d?sslsni=0", "sslsni is not supported"),
            (
                "postgres://db/d?ssl%70assword=x",
                "sslpassword is not supported",
            ),
            ("postgres://db/d?sslrootcert=%FF", "not UTF-8"),
        ];
        for (url, expected) in cases {
            let got = reason(split(url).unwrap_err());
            assert!(got.contains(expected), "{url}: {got}");
            assert!(got.starts_with("invalid PostgreSQL URL: "), "{got}");
        }
        let got = Target::parse("postgres://db/d?sslmode=verify-ca")
            .err()
            .map(reason);
        assert!(got.unwrap().contains("needs sslrootcert"));
    }

    #[test]
    fn an_sslmode_the_query_split_does_not_see_is_kept_as_the_driver_reads_it() {
        for (url, mode) in [
            // A `?` in the password: the credentials run to the `@`, for both readings.
            ("postgres://u:pa?ss@db/d?sslmode=require", SslMode::Require),
            ("postgres://u:pa?ssl@db/d?sslmode=disable", SslMode::Disable),
            ("host=db sslmode=require", SslMode::Require),
            ("host=db sslmode=disable", SslMode::Disable),
            ("host=db", SslMode::Prefer),
            ("postgres://u@db/d", SslMode::Prefer),
        ] {
            match Target::parse(url) {
                Ok(target) => assert_eq!(target.config.get_ssl_mode(), mode, "{url}"),
                // Without the `tls` feature, a URL that requires TLS is refused outright.
                Err(e) => {
                    assert!(
                        cfg!(not(feature = "tls")) && mode == SslMode::Require,
                        "{url}: {e}"
                    )
                }
            }
        }
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn without_the_tls_feature_a_url_asking_for_tls_is_refused() {
        for url in [
            "postgres://db/d?sslmode=require",
            "postgres://db/d?sslmode=verify-full",
            "postgres://db/d?sslrootcert=/ca.pem",
            "host=db sslmode=require",
        ] {
            let got = reason(Target::parse(url).err().unwrap());
            assert!(got.contains("`tls` feature"), "{url}: {got}");
        }
        for url in [
            "postgres://db/d",
            "postgres://db/d?sslmode=prefer",
            "host=db sslmode=disable",
        ] {
            assert!(Target::parse(url).is_ok(), "{url}");
        }
    }
}
