//! Secrets derived, not distributed: every key and token a node needs comes from the one
//! cluster secret through HKDF-SHA256 (RFC 5869) with a fixed label, so every node computes the
//! same values with no coordinator and no copying of keys.
//!
//! The labels are part of the on-disk contract: changing one changes a live cluster's keys.

use base64::Engine;
use hkdf::Hkdf;
use sha2::Sha256;

/// The labels (HKDF `info`) of every derived secret.
pub mod label {
    pub const CONSUL_GOSSIP: &str = "picoimg/v1/consul/gossip-key";
    pub const CONSUL_MANAGEMENT_TOKEN: &str = "picoimg/v1/consul/management-token";
}

/// Derives `len` bytes for `label` from the cluster secret; the cluster id is the salt, so two
/// clusters that somehow share a secret still get different keys.
pub fn derive(secret: &[u8; 32], cluster_id: &str, label: &str, len: usize) -> Vec<u8> {
    let hk = Hkdf::<Sha256>::new(Some(cluster_id.as_bytes()), secret);
    let mut out = vec![0u8; len];
    hk.expand(label.as_bytes(), &mut out)
        .expect("length is far below HKDF-SHA256's limit");
    out
}

/// Consul's gossip encryption key (`encrypt`): 32 bytes, standard base64.
pub fn consul_gossip_key(secret: &[u8; 32], cluster_id: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(derive(
        secret,
        cluster_id,
        label::CONSUL_GOSSIP,
        32,
    ))
}

/// Consul's initial management token: a UUID, as Consul formats its tokens.
pub fn consul_management_token(secret: &[u8; 32], cluster_id: &str) -> String {
    let b = derive(secret, cluster_id, label::CONSUL_MANAGEMENT_TOKEN, 16);
    uuid::Builder::from_random_bytes(b.try_into().expect("16 bytes"))
        .into_uuid()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 5869, test case 1: the HKDF in use is the standard one.
    #[test]
    fn rfc5869_case_1() {
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap();
        let hk = Hkdf::<Sha256>::new(Some(&salt), &ikm);
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        assert_eq!(
            hex::encode(okm),
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
        );
    }

    /// Pinned vectors: these values are what deployed clusters use; they must never change.
    #[test]
    fn pinned_vectors() {
        let secret = [7u8; 32];
        let id = "5f2b9a0e-7c1d-4e8a-9b3f-2d6c8e1a4b70";
        assert_eq!(consul_gossip_key(&secret, id), PINNED_GOSSIP);
        assert_eq!(consul_management_token(&secret, id), PINNED_TOKEN);
        assert_ne!(consul_gossip_key(&secret, "another-cluster"), PINNED_GOSSIP);
    }

    // Computed independently (Python hmac/hashlib HKDF) when pinned.
    const PINNED_GOSSIP: &str = "v56PW4ex8JnoICTWU2/IYgZzUzqCtcJJQ6+QYDpp42g=";
    const PINNED_TOKEN: &str = "9372d4f4-d864-4090-a5a4-dd62e307b9ab";
}
