//! Secrets derived, not distributed: every key and token a node needs comes from the one
//! cluster secret through HKDF-SHA256 (RFC 5869) with a fixed label, so every node computes the
//! same values with no coordinator and no copying of keys.
//!
//! Each stack declares its secrets (label, length, form: `crate::stack::SecretSpec`); the labels
//! are part of the on-disk contract: changing one changes a live cluster's keys.

use hkdf::Hkdf;
use sha2::Sha256;

/// Derives `len` bytes for `label` from the cluster secret; the cluster id is the salt, so two
/// clusters that somehow share a secret still get different keys.
pub fn derive(secret: &[u8; 32], cluster_id: &str, label: &str, len: usize) -> Vec<u8> {
    let hk = Hkdf::<Sha256>::new(Some(cluster_id.as_bytes()), secret);
    let mut out = vec![0u8; len];
    hk.expand(label.as_bytes(), &mut out)
        .expect("length is far below HKDF-SHA256's limit");
    out
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
}
