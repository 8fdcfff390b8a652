//! K3s's certificate authorities, derived from the cluster secret, so that a join token can
//! carry the CA's hash from the first boot (`K10<sha256>::user:password`: the joining node
//! checks the CA it is served against it, no trust on first use) and an admin kubeconfig can
//! be made on the workstation from the cluster file alone.
//!
//! What K3s does with pre-placed files (k3s-io/k3s, pkg/daemons/control/deps/deps.go, commit
//! 09ac65a6): `createSigningCertKey` uses `<data-dir>/server/tls/<name>-ca.{crt,key}` as they
//! are when both exist, for the client, server and request-header CAs and for
//! `etcd/server-ca` and `etcd/peer-ca`; `genServiceAccount` uses `service.key` when it
//! exists (any PEM private key `keyutil` reads; K3s's own CA keys are ECDSA P-256, as here).
//! The token hash (pkg/clientaccess/token.go, `hashCA`): for a file with one certificate, the
//! SHA-256 of the file's bytes, which `/cacerts` serves.
//!
//! Every key is a P-256 scalar from its own HKDF label; certificates are signed with RFC 6979
//! deterministic ECDSA and have fixed serials and validity, so every node (and `picoimg
//! cluster kubeconfig`) makes byte-identical files.

use anyhow::{Context, Result};
use p256::ecdsa::{DerSignature, SigningKey};
use p256::elliptic_curve::ops::Reduce;
use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{EncodePublicKey, LineEnding};
use p256::{FieldBytes, NonZeroScalar, Scalar, SecretKey};
use sha2::{Digest, Sha256};
use std::str::FromStr;
use std::time::{Duration, SystemTime};
use x509_cert::builder::{Builder, CertificateBuilder, Profile};
use x509_cert::der::EncodePem;
use x509_cert::ext::pkix::ExtendedKeyUsage;
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::spki::SubjectPublicKeyInfoOwned;
use x509_cert::time::{Time, Validity};

/// One of K3s's certificate authorities: its file (below `server/tls/`, without `.crt` or
/// `.key`), its common name, and the HKDF label of its key.
#[derive(Debug, Clone, Copy)]
pub struct Authority {
    pub file: &'static str,
    pub cn: &'static str,
    pub label: &'static str,
}

/// The five CAs K3s makes on its first start (deps.go: genClientCerts, genServerCerts,
/// genRequestHeaderCerts, genETCDCerts).
pub const AUTHORITIES: [Authority; 5] = [
    Authority {
        file: "server-ca",
        cn: "picoimg-k3s-server-ca",
        label: "picoimg/v1/k3s/ca/server",
    },
    Authority {
        file: "client-ca",
        cn: "picoimg-k3s-client-ca",
        label: "picoimg/v1/k3s/ca/client",
    },
    Authority {
        file: "request-header-ca",
        cn: "picoimg-k3s-request-header-ca",
        label: "picoimg/v1/k3s/ca/request-header",
    },
    Authority {
        file: "etcd/server-ca",
        cn: "picoimg-etcd-server-ca",
        label: "picoimg/v1/k3s/ca/etcd-server",
    },
    Authority {
        file: "etcd/peer-ca",
        cn: "picoimg-etcd-peer-ca",
        label: "picoimg/v1/k3s/ca/etcd-peer",
    },
];

/// The service-account signing key (`server/tls/service.key`).
pub const SERVICE_KEY_LABEL: &str = "picoimg/v1/k3s/service-account-key";

/// The key of the admin client certificate `picoimg cluster kubeconfig` writes.
pub const ADMIN_KEY_LABEL: &str = "picoimg/v1/k3s/admin-key";

/// The directory K3s keeps its server certificates in.
pub const TLS_DIR: &str = "var/lib/rancher/k3s/server/tls";

/// The CA the API is served under (what a kubeconfig trusts, what the token hashes).
pub fn server_ca() -> Authority {
    AUTHORITIES[0]
}

/// The CA client certificates are checked against.
pub fn client_ca() -> Authority {
    AUTHORITIES[1]
}

/// A P-256 private key from 32 derived bytes (reduced modulo the group order; zero has
/// probability 2^-256), as SEC 1 `EC PRIVATE KEY` PEM with the curve named and the public key
/// included, byte for byte what Go's `x509.MarshalECPrivateKey` writes. That form, not PKCS #8:
/// kube-apiserver reads `service.key` with client-go's `keyutil.ParsePublicKeysPEM`, which
/// takes EC private keys only through `x509.ParseECPrivateKey` (kubernetes/kubernetes,
/// staging/src/k8s.io/client-go/util/keyutil/key.go), and Go and openssl need the curve in
/// the file. The secrets table stores keys in this form, so they are redacted like every other
/// secret.
pub fn key_pem(bytes: &[u8]) -> String {
    let reduced = <Scalar as Reduce<p256::U256>>::reduce_bytes(FieldBytes::from_slice(bytes));
    let scalar = Option::<NonZeroScalar>::from(NonZeroScalar::new(reduced))
        .expect("a derived P-256 key is never zero");
    let key = SecretKey::from(scalar);
    let public = key.public_key().to_encoded_point(false);
    // ECPrivateKey ::= SEQUENCE { version 1, privateKey OCTET STRING (32),
    //   [0] namedCurve prime256v1 (1.2.840.10045.3.1.7), [1] publicKey BIT STRING (65) }
    let mut der = vec![0x30, 0x77, 0x02, 0x01, 0x01, 0x04, 0x20];
    der.extend_from_slice(&key.to_bytes());
    der.extend_from_slice(&[
        0xa0, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07,
    ]);
    der.extend_from_slice(&[0xa1, 0x44, 0x03, 0x42, 0x00]);
    der.extend_from_slice(public.as_bytes());
    debug_assert_eq!(der.len(), 0x79);
    x509_cert::der::pem::encode_string("EC PRIVATE KEY", LineEnding::LF, &der)
        .expect("a P-256 key encodes")
}

fn signing_key(pem: &str) -> Result<SigningKey> {
    let key = SecretKey::from_sec1_pem(pem).context("reading a derived P-256 key")?;
    Ok(SigningKey::from(key))
}

fn spki(key: &SigningKey) -> Result<SubjectPublicKeyInfoOwned> {
    let der = key
        .verifying_key()
        .to_public_key_der()
        .context("encoding a public key")?;
    SubjectPublicKeyInfoOwned::try_from(der.as_bytes()).context("reading a public key")
}

/// A serial that depends only on what the certificate is (RFC 5280: positive, at most 20
/// octets): the first 16 bytes of SHA-256 of `what`, top bit cleared.
fn serial(what: &str) -> Result<SerialNumber> {
    let mut b = [0u8; 16];
    b.copy_from_slice(&Sha256::digest(what.as_bytes())[..16]);
    b[0] &= 0x7f;
    b[0] |= 0x01;
    SerialNumber::new(&b).context("making a serial number")
}

/// From 2025-01-01 (before any cluster file of picoimg) to 9999-12-31 23:59:59, RFC 5280's
/// "no well-defined expiration": the CAs never need rotating, and nothing here depends on the
/// clock of the node that makes them.
fn validity() -> Result<Validity> {
    let at = |secs: u64| -> Result<Time> {
        Time::try_from(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
            .context("encoding a certificate time")
    };
    Ok(Validity {
        not_before: at(1_735_689_600)?,
        not_after: at(253_402_300_799)?,
    })
}

fn name(dn: &str) -> Result<Name> {
    Name::from_str(dn).with_context(|| format!("certificate name {dn}"))
}

/// The self-signed certificate of `ca` for its key `key_pem`, as PEM.
pub fn ca_cert_pem(ca: &Authority, key_pem: &str) -> Result<String> {
    let key = signing_key(key_pem)?;
    let builder = CertificateBuilder::new(
        Profile::Root,
        serial(ca.cn)?,
        validity()?,
        name(&format!("CN={}", ca.cn))?,
        spki(&key)?,
        &key,
    )
    .context("building a CA certificate")?;
    let cert = builder
        .build::<DerSignature>()
        .with_context(|| format!("signing the {} certificate", ca.cn))?;
    cert.to_pem(LineEnding::LF)
        .context("encoding a certificate as PEM")
}

/// A client certificate for `cn` in the groups `orgs`, for `key_pem`, signed by `ca` (its key
/// `ca_key_pem`); as PEM.
pub fn client_cert_pem(
    ca: &Authority,
    ca_key_pem: &str,
    cn: &str,
    orgs: &[&str],
    key_pem: &str,
) -> Result<String> {
    let ca_key = signing_key(ca_key_pem)?;
    let key = signing_key(key_pem)?;
    let mut dn: Vec<String> = vec![format!("CN={cn}")];
    dn.extend(orgs.iter().map(|o| format!("O={o}")));
    let mut builder = CertificateBuilder::new(
        Profile::Leaf {
            issuer: name(&format!("CN={}", ca.cn))?,
            enable_key_agreement: false,
            enable_key_encipherment: false,
        },
        serial(&format!("{}/{}", ca.cn, dn.join(",")))?,
        validity()?,
        name(&dn.join(","))?,
        spki(&key)?,
        &ca_key,
    )
    .context("building a client certificate")?;
    builder
        .add_extension(&ExtendedKeyUsage(vec![
            x509_cert::der::oid::db::rfc5280::ID_KP_CLIENT_AUTH,
        ]))
        .context("adding the client-auth usage")?;
    let cert = builder
        .build::<DerSignature>()
        .with_context(|| format!("signing the certificate of {cn}"))?;
    cert.to_pem(LineEnding::LF)
        .context("encoding a certificate as PEM")
}

/// The CA hash a K10 token carries for a CA file of one certificate (k3s `hashCA`).
pub fn ca_hash(ca_cert_pem: &str) -> String {
    hex::encode(Sha256::digest(ca_cert_pem.as_bytes()))
}

/// K3s's full token: `K10<ca hash>::<user>:<password>` (users `server` and `node`, the agent
/// token's; pkg/daemons/control/deps/deps.go `readTokens`).
pub fn full_token(ca_cert_pem: &str, user: &str, password: &str) -> String {
    format!("K10{}::{user}:{password}", ca_hash(ca_cert_pem))
}

/// Who the admin kubeconfig authenticates as: K3s's own admin (deps.go `genClientCerts`:
/// `system:admin` in `system:masters`, Kubernetes's privileged group).
pub const ADMIN_CN: &str = "system:admin";
pub const ADMIN_GROUP: &str = "system:masters";

/// An admin kubeconfig for the cluster `name` whose API is at `server` (`https://host:6443`):
/// the derived server CA to trust, a client certificate for `system:admin` signed by the
/// derived client CA, and its key. Made from the cluster file alone; the same bytes each time.
pub fn admin_kubeconfig(
    secrets: &crate::stack::Secrets,
    name: &str,
    server: &str,
) -> Result<String> {
    use base64::Engine;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let server_ca = server_ca();
    let ca_cert = ca_cert_pem(&server_ca, secrets.get(server_ca.label)?)?;
    let client = client_ca();
    let key = secrets.get(ADMIN_KEY_LABEL)?;
    let cert = client_cert_pem(
        &client,
        secrets.get(client.label)?,
        ADMIN_CN,
        &[ADMIN_GROUP],
        key,
    )?;
    let user = format!("{name}-admin");
    Ok(format!(
        "# K3s admin access to cluster {name}, made by picoimg from the cluster file: keep it as\n\
         # private as that file. Use: KUBECONFIG=this-file kubectl get nodes\n\
         apiVersion: v1\n\
         kind: Config\n\
         clusters:\n\
         - cluster:\n    certificate-authority-data: {}\n    server: {server}\n  name: {name}\n\
         contexts:\n\
         - context:\n    cluster: {name}\n    user: {user}\n  name: {name}\n\
         current-context: {name}\n\
         preferences: {{}}\n\
         users:\n\
         - name: {user}\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\n",
        b64(&ca_cert),
        b64(&cert),
        b64(key),
    ))
}
