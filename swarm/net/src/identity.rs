//! Peer identity: a persistent ed25519 key, and the peer id derived from it.
//!
//! The peer id is the BLAKE3 hash of the 32-byte public key, so it commits to the key: a peer can
//! only claim the id whose key it holds, which TLS then proves on every connection.

use std::fmt;
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// File name of the key inside a peer's data folder.
pub const KEY_FILE: &str = "identity.key.pem";

/// A peer's id: BLAKE3 of its ed25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PeerId(pub [u8; 32]);

impl PeerId {
    /// The id of an ed25519 public key: the BLAKE3 hash of its bytes.
    pub fn from_public_key(key: &VerifyingKey) -> PeerId {
        PeerId(*blake3::hash(key.as_bytes()).as_bytes())
    }

    /// A short readable form for logs and tables (first 6 bytes, hex).
    pub fn short(&self) -> String {
        hex::encode(&self.0[..6])
    }

    /// Parses the full 64-hex-digit form.
    pub fn parse(s: &str) -> Option<PeerId> {
        let bytes = hex::decode(s.trim()).ok()?;
        Some(PeerId(bytes.try_into().ok()?))
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerId({})", self.short())
    }
}

/// A peer's signing key and the id it implies.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    id: PeerId,
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Identity({})", self.id.short())
    }
}

impl Identity {
    /// A fresh random identity (not persisted).
    pub fn generate() -> Identity {
        Identity::from_secret(rand::random::<[u8; 32]>())
    }

    /// A deterministic identity from 32 secret bytes (tests, simulations).
    pub fn from_secret(secret: [u8; 32]) -> Identity {
        let key = SigningKey::from_bytes(&secret);
        let id = PeerId::from_public_key(&key.verifying_key());
        Identity { key, id }
    }

    /// Loads `DIR/identity.key.pem`, creating the folder and a new key on first start.
    pub fn load_or_create(dir: &Path) -> Result<Identity> {
        let path = dir.join(KEY_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        match std::fs::read_to_string(&path) {
            Ok(pem) => {
                let key = SigningKey::from_pkcs8_pem(&pem).map_err(|e| Error::BadKey {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let id = PeerId::from_public_key(&key.verifying_key());
                Ok(Identity { key, id })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(io(dir))?;
                let identity = Identity::generate();
                let pem = identity.pkcs8_pem();
                write_private(&path, pem.as_bytes()).map_err(io(&path))?;
                Ok(identity)
            }
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// This identity's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.id
    }

    /// This identity's public key.
    pub fn public_key(&self) -> VerifyingKey {
        self.key.verifying_key()
    }

    /// Signs `message` with this identity's key (ed25519).
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.key.sign(message).to_bytes()
    }

    /// The key as PKCS#8 DER, for building the TLS certificate (rcgen).
    pub fn pkcs8_der(&self) -> Vec<u8> {
        self.key
            .to_pkcs8_der()
            .expect("an ed25519 key always encodes")
            .as_bytes()
            .to_vec()
    }

    fn pkcs8_pem(&self) -> String {
        self.key
            .to_pkcs8_pem(Default::default())
            .expect("an ed25519 key always encodes")
            .to_string()
    }

    /// Where the identity key lives in a data folder.
    pub fn key_path(dir: &Path) -> PathBuf {
        dir.join(KEY_FILE)
    }
}

/// Checks `signature` over `message` by the holder of `public_key`.
pub fn verify(public_key: &[u8; 32], message: &[u8], signature: &[u8; 64]) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public_key) else {
        return false;
    };
    key.verify(message, &Signature::from_bytes(signature))
        .is_ok()
}

#[cfg(unix)]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(not(unix))]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_persists_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::load_or_create(dir.path()).unwrap();
        let b = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        let other = Identity::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert_ne!(a.peer_id(), other.peer_id());
    }

    #[test]
    fn corrupt_key_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(KEY_FILE), "not a key").unwrap();
        let err = Identity::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(err, Error::BadKey { .. }), "{err}");
    }

    #[test]
    fn signatures_verify_only_for_the_signer_and_message() {
        let a = Identity::from_secret([1; 32]);
        let b = Identity::from_secret([2; 32]);
        let sig = a.sign(b"record");
        assert!(verify(a.public_key().as_bytes(), b"record", &sig));
        assert!(!verify(a.public_key().as_bytes(), b"recorD", &sig));
        assert!(!verify(b.public_key().as_bytes(), b"record", &sig));
    }

    #[test]
    fn peer_id_round_trips_through_text() {
        let id = Identity::from_secret([7; 32]).peer_id();
        assert_eq!(PeerId::parse(&id.to_string()), Some(id));
        assert_eq!(id.short().len(), 12);
        assert!(PeerId::parse("zz").is_none());
    }
}
