use super::*;
use crate::stack::Secrets;

/// Pinned vectors: these values are what deployed clusters use; they must never change.
/// Computed independently (Python hmac/hashlib HKDF) when pinned.
#[test]
fn pinned_vectors() {
    let secret = [7u8; 32];
    let id = "5f2b9a0e-7c1d-4e8a-9b3f-2d6c8e1a4b70";
    let s = Secrets::derive(&[&Consul], &secret, id, &[]);
    assert_eq!(
        s.get(label::GOSSIP).unwrap(),
        "v56PW4ex8JnoICTWU2/IYgZzUzqCtcJJQ6+QYDpp42g="
    );
    assert_eq!(
        s.get(label::MANAGEMENT_TOKEN).unwrap(),
        "9372d4f4-d864-4090-a5a4-dd62e307b9ab"
    );
    let other = Secrets::derive(&[&Consul], &secret, "another-cluster", &[]);
    assert_ne!(
        other.get(label::GOSSIP).unwrap(),
        s.get(label::GOSSIP).unwrap()
    );
    // A secret no registered stack declares cannot be had.
    assert!(Secrets::derive(&[], &secret, id, &[])
        .get(label::GOSSIP)
        .is_err());
}

#[test]
fn init_gives_an_odd_number_of_servers() {
    for (nodes, servers) in [(1, 1), (2, 1), (3, 3), (5, 3), (9, 3)] {
        let n = (0..nodes)
            .filter(|i| Consul.init_roles(*i, nodes) == [SERVER])
            .count();
        assert_eq!(n, servers, "{nodes} nodes");
    }
}
