//! The rustls configuration a URL's TLS parameters ask for (see [`crate::connect`]): the
//! trusted authorities, the check of the server's certificate, the client certificate.

use std::sync::Arc;

use idem_core::Error;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::connect::{TlsParameters, Verify, invalid};

/// The connector for every connection of a store.
pub(crate) fn connector(parameters: &TlsParameters) -> Result<MakeRustlsConnect, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls_error("no TLS protocol version to offer", e))?;
    let builder = match parameters.verify()? {
        Verify::Nothing => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Unverified(provider))),
        Verify::Chain => {
            let roots = roots(parameters.root_cert.as_deref())?;
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| tls_error("cannot check certificates", e))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyName(inner)))
        }
        Verify::Full => builder.with_root_certificates(roots(parameters.root_cert.as_deref())?),
    };
    let config = match (&parameters.cert, &parameters.key) {
        (Some(cert), Some(key)) => {
            let chain = certificates("sslcert", cert)?;
            let key = PrivateKeyDer::from_pem_slice(&read("sslkey", key)?).map_err(|e| {
                invalid(&format!("sslkey {key:?} holds no private key in PEM: {e}"))
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| invalid(&format!("sslcert and sslkey do not make a pair: {e}")))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(MakeRustlsConnect::new(config))
}

fn tls_error(what: &str, e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::backend(format!("postgres: {what}"), e)
}

fn read(name: &str, path: &str) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| invalid(&format!("cannot read {name} {path:?}: {e}")))
}

/// Every certificate of a PEM file, at least one.
fn certificates(name: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem = read(name, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(&format!("{name} {path:?} is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(invalid(&format!("{name} {path:?} holds no certificate")));
    }
    Ok(certs)
}

/// The trusted authorities: those of `sslrootcert`'s file, or the system's (`system`, or no
/// `sslrootcert`).
fn roots(root_cert: Option<&str>) -> Result<RootCertStore, Error> {
    let mut roots = RootCertStore::empty();
    match root_cert {
        Some(path) if path != "system" => {
            let (added, _) = roots.add_parsable_certificates(certificates("sslrootcert", path)?);
            if added == 0 {
                return Err(invalid(&format!(
                    "sslrootcert {path:?} holds no certificate usable as an authority"
                )));
            }
        }
        _ => {
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default();
                return Err(Error::InvalidRequest {
                    reason: format!(
                        "no authority certificate found on this system{why}: give the \
                         server's authority with sslrootcert=FILE"
                    ),
                });
            }
        }
    }
    Ok(roots)
}

/// `sslmode=prefer`, and `require` without `sslrootcert`, as libpq has them: the session is
/// encrypted and the handshake's signatures checked, the certificate itself is not.
#[derive(Debug)]
struct Unverified(Arc<CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the certificate must chain to a trusted authority (the webpki
/// verifier checks the chain first, the name last), whatever host it names.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::connect::Mode;
    use crate::connect::tests::reason;

    #[test]
    fn missing_or_empty_files_are_refused_with_their_path() {
        let dir = std::env::temp_dir().join(format!("idem-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let empty = empty.to_str().unwrap().to_owned();
        let cases = [
            (
                TlsParameters {
                    mode: Some(Mode::VerifyFull),
                    root_cert: Some("/nonexistent/ca.pem".into()),
                    ..TlsParameters::default()
                },
                "cannot read sslrootcert \"/nonexistent/ca.pem\"",
            ),
            (
                TlsParameters {
                    mode: Some(Mode::VerifyCa),
                    root_cert: Some(empty.clone()),
                    ..TlsParameters::default()
                },
                "holds no certificate",
            ),
            (
                TlsParameters {
                    mode: Some(Mode::Require),
                    cert: Some(empty.clone()),
                    key: Some(empty.clone()),
                    ..TlsParameters::default()
                },
                "sslcert",
            ),
        ];
        for (parameters, expected) in cases {
            let got = reason(connector(&parameters).err().unwrap());
            assert!(got.contains(expected), "{parameters:?}: {got}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_modes_without_a_file_build_a_connector() {
        for mode in [
            None,
            Some(Mode::Disable),
            Some(Mode::Prefer),
            Some(Mode::Require),
        ] {
            connector(&TlsParameters {
                mode,
                ..TlsParameters::default()
            })
            .unwrap();
        }
    }
}
