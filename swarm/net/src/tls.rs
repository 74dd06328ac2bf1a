//! Mutual TLS 1.3 between peers: self-signed ed25519 certificates, peer ids pinned by verifiers.
//!
//! There is no certificate authority. A peer's certificate is self-signed with its identity key; the
//! verifiers ignore names, chains and dates and instead (1) take the ed25519 public key out of the
//! certificate's SubjectPublicKeyInfo, (2) derive the [`PeerId`] from it, (3) check it against the
//! id the caller expects and the run's allow-list, and (4) check the TLS 1.3 handshake signature
//! with that same key, which proves the remote holds the private key of the id it claims.

use std::collections::HashSet;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer,
    UnixTime,
};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::error::{Error, Result};
use crate::identity::{Identity, PeerId};

/// The server name every peer uses in its certificate and in SNI; identity comes from the key.
pub const SERVER_NAME: &str = "swarm-peer";
/// ALPN protocol id: peers that speak something else fail the handshake.
pub const ALPN: &[u8] = b"swarm/1";

/// DER prefix of an ed25519 SubjectPublicKeyInfo: SEQUENCE { SEQUENCE { OID 1.3.101.112 },
/// BIT STRING (0 unused bits) } followed by the 32-byte key; 44 bytes in all (RFC 8410).
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// The set of peer ids a run admits; connections from or to any other id are refused in the
/// handshake.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    ids: HashSet<PeerId>,
}

impl AllowList {
    /// Allows exactly `ids`.
    pub fn new(ids: impl IntoIterator<Item = PeerId>) -> AllowList {
        AllowList {
            ids: ids.into_iter().collect(),
        }
    }

    /// Whether `id` is allowed.
    pub fn contains(&self, id: &PeerId) -> bool {
        self.ids.contains(id)
    }

    /// Allows `id` too.
    pub fn insert(&mut self, id: PeerId) {
        self.ids.insert(id);
    }

    /// How many ids are allowed.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether nobody is allowed.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

impl std::str::FromStr for AllowList {
    type Err = Error;

    /// Comma- or whitespace-separated full peer ids (64 hex digits each).
    fn from_str(s: &str) -> Result<AllowList> {
        let mut list = AllowList::default();
        for part in s.split(|c: char| c == ',' || c.is_whitespace()) {
            if part.is_empty() {
                continue;
            }
            let id = PeerId::parse(part).ok_or_else(|| Error::BadPeerId(part.to_owned()))?;
            list.insert(id);
        }
        Ok(list)
    }
}

/// The ring provider restricted to what we use: rustls's defaults are TLS 1.3-capable, and the
/// protocol version is pinned to 1.3 where configs are built.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The peer's certificate (self-signed with its identity key) and that key for rustls.
pub fn certificate(
    identity: &Identity,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>)> {
    let pkcs8 = identity.pkcs8_der();
    let key_der = PrivatePkcs8KeyDer::from(pkcs8);
    let key_pair = rcgen::KeyPair::try_from(&key_der).map_err(|e| Error::Tls(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()])
        .map_err(|e| Error::Tls(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, identity.peer_id().to_string());
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| Error::Tls(e.to_string()))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(key_der)))
}

/// The ed25519 public key inside a certificate, parsed strictly (webpki for the X.509 structure,
/// then the exact RFC 8410 SubjectPublicKeyInfo layout).
pub fn public_key_of(cert: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let parsed = ParsedCertificate::try_from(cert)?;
    ed25519_key_of_spki(&parsed.subject_public_key_info())
}

fn ed25519_key_of_spki(spki: &SubjectPublicKeyInfoDer<'_>) -> Result<[u8; 32], rustls::Error> {
    let der: &[u8] = spki.as_ref();
    if der.len() != 44 || der[..12] != ED25519_SPKI_PREFIX {
        return Err(rustls::Error::InvalidCertificate(
            CertificateError::BadEncoding,
        ));
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(&der[12..]);
    Ok(key)
}

/// The peer id proven by a certificate.
pub fn peer_id_of(cert: &CertificateDer<'_>) -> Result<PeerId, rustls::Error> {
    let key = public_key_of(cert)?;
    Ok(PeerId(*blake3::hash(&key).as_bytes()))
}

/// The shared checks of both verifiers.
#[derive(Debug)]
struct PeerVerifier {
    /// Only this id is accepted (client side, when the caller knows whom it dials).
    expected: Option<PeerId>,
    allow: Option<Arc<AllowList>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PeerVerifier {
    fn new(expected: Option<PeerId>, allow: Option<Arc<AllowList>>) -> PeerVerifier {
        PeerVerifier {
            expected,
            allow,
            algorithms: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    fn check_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
    ) -> Result<(), rustls::Error> {
        if !intermediates.is_empty() {
            // Self-signed only: a chain means someone else's PKI.
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::BadEncoding,
            ));
        }
        let id = peer_id_of(end_entity)?;
        if let Some(expected) = self.expected
            && expected != id
        {
            tracing::warn!(expected = %expected.short(), got = %id.short(), "peer presented another id");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        if let Some(allow) = &self.allow
            && !allow.contains(&id)
        {
            tracing::warn!(peer = %id.short(), "peer is not on the allow-list");
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(())
    }

    fn check_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if dss.scheme != SignatureScheme::ED25519 {
            return Err(rustls::Error::PeerMisbehaved(
                rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme,
            ));
        }
        let parsed = ParsedCertificate::try_from(cert)?;
        let spki = parsed.subject_public_key_info();
        // Same key the id was derived from: the signature proves possession of that id's key.
        ed25519_key_of_spki(&spki)?;
        rustls::crypto::verify_tls13_signature_with_raw_key(message, &spki, dss, &self.algorithms)
    }
}

/// Client side: verifies the server.
#[derive(Debug)]
struct ServerVerifier(PeerVerifier);

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.0.check_cert(end_entity, intermediates)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// Server side: verifies the client; client authentication is mandatory.
#[derive(Debug)]
struct ClientVerifier(PeerVerifier);

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.check_cert(end_entity, intermediates)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls13RequiredForQuic,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.check_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

/// TLS 1.3 server config: our certificate, mandatory client certificates checked against `allow`.
pub fn server_config(
    identity: &Identity,
    allow: Option<Arc<AllowList>>,
) -> Result<rustls::ServerConfig> {
    let (cert, key) = certificate(identity)?;
    let verifier = Arc::new(ClientVerifier(PeerVerifier::new(None, allow)));
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT data could be replayed; requests are not idempotent in general.
    config.max_early_data_size = 0;
    Ok(config)
}

/// TLS 1.3 client config presenting our certificate, accepting only `expected` (if given) and ids
/// on `allow` (if given).
pub fn client_config(
    identity: &Identity,
    expected: Option<PeerId>,
    allow: Option<Arc<AllowList>>,
) -> Result<rustls::ClientConfig> {
    let (cert, key) = certificate(identity)?;
    client_config_with(cert, key, expected, allow)
}

/// [`client_config`] with a certificate made earlier by [`certificate`] (dialling is frequent).
pub fn client_config_with(
    cert: CertificateDer<'static>,
    key: PrivateKeyDer<'static>,
    expected: Option<PeerId>,
    allow: Option<Arc<AllowList>>,
) -> Result<rustls::ClientConfig> {
    let verifier = Arc::new(ServerVerifier(PeerVerifier::new(expected, allow)));
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| Error::Tls(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(vec![cert], key)
        .map_err(|e| Error::Tls(e.to_string()))?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity_key() {
        let id = Identity::from_secret([5; 32]);
        let (cert, _) = certificate(&id).unwrap();
        assert_eq!(public_key_of(&cert).unwrap(), *id.public_key().as_bytes());
        assert_eq!(peer_id_of(&cert).unwrap(), id.peer_id());
    }

    #[test]
    fn garbage_certificates_are_refused_without_panic() {
        let id = Identity::from_secret([6; 32]);
        let (cert, _) = certificate(&id).unwrap();
        let der = cert.as_ref().to_vec();
        for cut in [0, 1, 10, der.len() / 2, der.len() - 1] {
            assert!(peer_id_of(&CertificateDer::from(der[..cut].to_vec())).is_err());
        }
        let mut flipped = der.clone();
        for i in (0..flipped.len()).step_by(7) {
            flipped[i] ^= 0x55;
            let _ = peer_id_of(&CertificateDer::from(flipped.clone()));
            flipped[i] ^= 0x55;
        }
    }

    #[test]
    fn non_ed25519_keys_are_refused() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec![SERVER_NAME.into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert!(public_key_of(cert.der()).is_err());
    }

    #[test]
    fn verifier_pins_expected_id_and_allow_list() {
        let a = Identity::from_secret([1; 32]);
        let b = Identity::from_secret([2; 32]);
        let (cert_a, _) = certificate(&a).unwrap();
        let pinned = PeerVerifier::new(Some(b.peer_id()), None);
        assert!(pinned.check_cert(&cert_a, &[]).is_err());
        let pinned = PeerVerifier::new(Some(a.peer_id()), None);
        assert!(pinned.check_cert(&cert_a, &[]).is_ok());
        let allow = Arc::new(AllowList::new([b.peer_id()]));
        assert!(
            PeerVerifier::new(None, Some(allow))
                .check_cert(&cert_a, &[])
                .is_err()
        );
    }

    #[test]
    fn allow_list_parses() {
        let a = Identity::from_secret([1; 32]).peer_id();
        let b = Identity::from_secret([2; 32]).peer_id();
        let list: AllowList = format!("{a}, {b}").parse().unwrap();
        assert!(list.contains(&a) && list.contains(&b));
        assert_eq!(list.len(), 2);
        assert!("abc".parse::<AllowList>().is_err());
    }
}
