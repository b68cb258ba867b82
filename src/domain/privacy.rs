//! VeraIds are personal data: the broker stores only keyed digests of them.

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::ids::VeraId;

/// HMAC-SHA-256 of a VeraId's canonical form under the server secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VeraIdDigest(pub [u8; 32]);

impl VeraIdDigest {
    /// The first 8 hex digits: enough to correlate log lines, useless to reverse.
    pub fn short(&self) -> String {
        super::hex::lower(&self.0[..4])
    }
}

/// Computes VeraId digests under one secret key.
#[derive(Clone)]
pub struct VeraIdDigester {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for VeraIdDigester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VeraIdDigester(<secret>)")
    }
}

impl VeraIdDigester {
    /// A digester keyed with `secret` (any length; 32 random bytes in practice).
    pub fn new(secret: &[u8]) -> Self {
        Self {
            // HMAC accepts keys of any length, so this cannot fail.
            mac: <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length")),
        }
    }

    /// A fingerprint of the secret, stored to recognise it on the next start without
    /// storing it. Keyed over a label with a NUL byte, which no VeraId contains, so it is
    /// never the digest of a VeraId.
    pub fn fingerprint(&self) -> Vec<u8> {
        let mut mac = self.mac.clone();
        mac.update(b"\0letro-server VeraId secret fingerprint");
        mac.finalize().into_bytes().to_vec()
    }

    /// The digest of `id`.
    pub fn digest(&self, id: &VeraId) -> VeraIdDigest {
        let mut mac = self.mac.clone();
        mac.update(id.canonical().as_bytes());
        VeraIdDigest(mac.finalize().into_bytes().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_depend_on_secret_and_canonical_id() {
        let a = VeraId::parse("alice@Example.com").expect("valid");
        let a2 = VeraId::parse("alice@example.COM").expect("valid");
        let b = VeraId::parse("bob@example.com").expect("valid");
        let d1 = VeraIdDigester::new(b"one");
        let d2 = VeraIdDigester::new(b"two");
        assert_eq!(d1.digest(&a), d1.digest(&a2));
        assert_ne!(d1.digest(&a), d1.digest(&b));
        assert_ne!(d1.digest(&a), d2.digest(&a));
        assert_eq!(d1.digest(&a).short().len(), 8);
    }
}
