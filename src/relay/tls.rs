//! TLS for the origin-edge QUIC link: the origin has a self-signed certificate (made at start,
//! or kept in its `--data-dir`) and prints its SHA-256 fingerprint; an edge pins it (`--origin-fingerprint`) or, on a trusted
//! network, accepts any certificate with a warning.

use std::sync::Arc;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

/// Version 2: datagrams carry the origin's send time (an 11-byte tag).
pub(crate) const ALPN: &[u8] = b"chorus-relay/2";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

pub(crate) fn fingerprint(cert: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, cert);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Each side pings this often when idle, so a lost peer is noticed within [`LINK_IDLE_TIMEOUT`].
pub(crate) const LINK_KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(1);
/// A link that hears nothing for this long is closed: an edge then tells its viewers their
/// sources are inactive and relinks. Five missed keep-alives.
pub(crate) const LINK_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// quinn's datagram send and receive buffers: about 100 ms of a link at 10 Mbit/s (some 150
/// Opus sources talking at once, or a few with video). When full, the sender's quinn drops the
/// oldest queued datagram (counted at the origin as `send_buffer_full`): queued audio older than
/// that is worth less than a gap, so the buffers are sized to what is worth sending, not to
/// seconds of backlog.
pub(crate) const LINK_DATAGRAM_BUFFER: usize = 128 * 1024;

fn transport() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(LINK_KEEPALIVE));
    t.max_idle_timeout(Some(LINK_IDLE_TIMEOUT.try_into().expect("in range")));
    t.datagram_receive_buffer_size(Some(LINK_DATAGRAM_BUFFER));
    t.datagram_send_buffer_size(LINK_DATAGRAM_BUFFER);
    // Video RTP is up to ~1200 bytes plus our 7-byte tag: start above the 1200-byte default.
    t.initial_mtu(1400);
    t
}

/// A TLS setup for the relay that rustls or quinn refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// rustls refused the certificate, key or configuration.
    #[error("relay TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The rustls configuration has no cipher suite QUIC can use.
    #[error("relay TLS for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// A server config with this certificate (DER) and PKCS#8 key (see
/// [`crate::auth::identity`]), and the certificate's fingerprint.
pub fn server_config(cert: &[u8], key: &[u8]) -> Result<(quinn::ServerConfig, String), TlsError> {
    let der = CertificateDer::from(cert.to_vec());
    let fp = fingerprint(&der);
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_vec()));
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(vec![der], key)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicServerConfig::try_from(tls)?;
    let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport()));
    Ok((cfg, fp))
}

/// A client config that accepts the origin whose certificate has this fingerprint (hex
/// SHA-256), or any origin when `pin` is None.
pub fn client_config(pin: Option<String>) -> Result<quinn::ClientConfig, TlsError> {
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            pin: pin.map(|p| p.to_ascii_lowercase().replace(':', "")),
        }))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport()));
    Ok(cfg)
}

#[derive(Debug)]
struct Pinned {
    pin: Option<String>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.pin {
            Some(pin) if *pin != fingerprint(end_entity) => Err(rustls::Error::General(format!(
                "origin certificate fingerprint {} is not the pinned {pin}",
                fingerprint(end_entity)
            ))),
            _ => Ok(ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use crate::auth::identity::Identity;

    #[test]
    fn the_origin_identity_certificate_serves_quic() {
        let i = Identity::load(None, None).unwrap();
        let (_, fp) = super::server_config(&i.cert_der, &i.cert_key_der).unwrap();
        assert_eq!(fp, super::fingerprint(&i.cert_der));
    }
}
