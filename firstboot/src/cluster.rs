//! The cluster file (`picoimg/cluster.toml` on the boot partition): one file for every node,
//! versioned (`schema = "picoimg.cluster/1"`), parsed strictly, and checked as a whole so that
//! `picoimg cluster check` and a booting node report every problem with its line.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use base64::Engine;
use serde::Deserialize;
use toml::Spanned;

use crate::stack::{Raw, Sections, Stack};

/// The schema this code reads.
pub const SCHEMA: &str = "picoimg.cluster/1";
const SCHEMA_PREFIX: &str = "picoimg.cluster/";

/// One problem in a cluster file, where it is and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line, 0 when the whole file is concerned.
    pub line: usize,
    /// The key, as a path (`node[2].address`).
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.field, self.message)
    }
}

impl Problem {
    /// `FILE:LINE: field: message`, or `FILE: field: message` for a problem of the whole file
    /// (line 0): the one way problems are printed, by `picoimg` and by the nodes.
    pub fn located(&self, file: &str) -> String {
        if self.line == 0 {
            format!("{file}: {}: {}", self.field, self.message)
        } else {
            format!("{file}:{}: {}: {}", self.line, self.field, self.message)
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterFile {
    pub schema: Spanned<String>,
    pub cluster: Spanned<Cluster>,
    pub network: Network,
    #[serde(default)]
    pub time: Time,
    #[serde(default, rename = "user")]
    pub users: Vec<User>,
    #[serde(default, rename = "node")]
    pub nodes: Vec<Node>,
    #[serde(default)]
    pub firstboot: FirstBoot,
    /// The registered stacks' sections (`crate::stack::Stack::section`), each parsed by its
    /// stack into its own type.
    #[serde(skip)]
    pub stacks: Sections,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    pub name: Spanned<String>,
    pub id: Spanned<String>,
    /// 32 random bytes, base64. Every key and token is derived from it.
    #[serde(default)]
    pub secret: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// IPv4 subnet of the cluster's nodes, `a.b.c.d/len`.
    pub subnet: Spanned<String>,
    pub gateway: Spanned<String>,
    #[serde(default)]
    pub dns: Vec<Spanned<String>>,
    /// NTP servers (host names or addresses); empty: the DHCP-provided or distribution
    /// defaults.
    #[serde(default)]
    pub ntp: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimePolicy {
    /// Wait for the clock to be synchronised before cluster steps, up to `timeout` seconds;
    /// then go on with a warning.
    #[default]
    Sync,
    /// As `sync`, but a clock still unsynchronised after `timeout` fails the node.
    Require,
    /// Do not wait (for clusters without a time source; TLS and storage clusters may complain).
    Skip,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Time {
    #[serde(default)]
    pub policy: TimePolicy,
    /// Seconds to wait for synchronisation before failing.
    #[serde(default = "default_time_timeout")]
    pub timeout: u64,
}

impl Default for Time {
    fn default() -> Self {
        Time {
            policy: TimePolicy::Sync,
            timeout: default_time_timeout(),
        }
    }
}

fn default_time_timeout() -> u64 {
    180
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    pub name: Spanned<String>,
    #[serde(default)]
    pub ssh_keys: Vec<Spanned<String>>,
    /// Member of sudo (passwordless: there are no passwords).
    #[serde(default = "yes")]
    pub sudo: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    pub name: Spanned<String>,
    /// A static IPv4 address in the subnet, or "dhcp".
    pub address: Spanned<String>,
    /// The board the node is (`h4`, `c5`, ... as `picoimg boards` names them), for clusters of
    /// several boards: `picoimg build --cluster` builds an image for each board the file names,
    /// `picoimg run --cluster` boots each node from its board's image, and a node whose image
    /// was built for another board refuses to configure itself.
    pub board: Option<Spanned<String>>,
    /// How the node recognises itself when neither the kernel command line nor node.toml
    /// names it.
    #[serde(default, rename = "match")]
    pub matcher: Option<Match>,
    /// Roles, each served by one registered stack (`crate::stack::Stack::roles`); none: the
    /// node gets the base steps only.
    #[serde(default)]
    pub roles: Vec<Spanned<String>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Match {
    pub mac: Option<Spanned<String>>,
    /// Raspberry Pi serial number (/proc/device-tree/serial-number).
    pub serial: Option<Spanned<String>>,
    /// DMI product UUID (/sys/class/dmi/id/product_uuid), x86 boards.
    pub dmi_uuid: Option<Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirstBoot {
    /// Remove the secret from the boot partition's copy once a node has applied the file.
    #[serde(default = "yes")]
    pub scrub_secret: bool,
    /// Seconds a node waits for its cluster services to be healthy before it reports failure.
    #[serde(default = "default_health_timeout")]
    pub health_timeout: u64,
}

fn default_health_timeout() -> u64 {
    900
}

impl Default for FirstBoot {
    fn default() -> Self {
        FirstBoot {
            scrub_secret: true,
            health_timeout: default_health_timeout(),
        }
    }
}

/// A checked cluster file, with the warnings (such as a newer minor schema) it raised.
#[derive(Debug, Clone)]
pub struct Checked {
    pub file: ClusterFile,
    pub secret: [u8; 32],
    pub warnings: Vec<Problem>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The 1-based line of a spanned value of `text`.
pub fn at<T>(text: &str, s: &Spanned<T>) -> usize {
    line_of(text, s.span().start)
}

/// Parses and checks a cluster file: every problem found, each with its line.
pub fn check(text: &str) -> Result<Checked, Vec<Problem>> {
    check_with(text, None)
}

/// As [`check`], with the secret a node kept from an earlier run for a file whose secret
/// was scrubbed from the boot partition (`secret = ""`).
pub fn check_with(text: &str, kept_secret: Option<[u8; 32]>) -> Result<Checked, Vec<Problem>> {
    check_in(text, kept_secret, crate::stacks::registry())
}

/// As [`check_with`], with the sections, roles and checks of `stacks` (the registry, or a
/// test's own list).
pub fn check_in(
    text: &str,
    kept_secret: Option<[u8; 32]>,
    stacks: &[&dyn Stack],
) -> Result<Checked, Vec<Problem>> {
    let mut warnings = Vec::new();
    // The schema first, so a file from another major version gets that message, not a list
    // of fields this version does not know.
    if let Ok(v) = text.parse::<toml::Table>() {
        if let Some(toml::Value::String(schema)) = v.get("schema") {
            match schema_version(schema) {
                Some((1, 0)) => {}
                Some((1, minor)) => warnings.push(Problem {
                    line: 0,
                    field: "schema".into(),
                    message: format!(
                        "{schema} is newer than this picoimg ({SCHEMA}); keys it does not know \
                         are refused: update picoimg if the file uses them (minor {minor})"
                    ),
                }),
                Some((major, _)) => {
                    return Err(vec![Problem {
                        line: 1,
                        field: "schema".into(),
                        message: format!(
                            "{schema} is major version {major}: this picoimg reads {SCHEMA} only"
                        ),
                    }])
                }
                None => {
                    return Err(vec![Problem {
                        line: 1,
                        field: "schema".into(),
                        message: format!(
                            "\"{schema}\" is not a picoimg cluster schema; expected \"{SCHEMA}\""
                        ),
                    }])
                }
            }
        }
    }
    let file = parse(text, stacks)?;
    let mut p = Vec::new();
    let secret = check_cluster(text, &file, kept_secret, &mut p);
    let subnet = check_network(text, &file, &mut p);
    check_users(text, &file, stacks, &mut p);
    check_nodes(text, &file, subnet, stacks, &mut p);
    check_limits(text, &file, &mut p);
    for s in stacks {
        s.check(text, &file, &mut p);
        warnings.extend(s.warnings(text, &file));
    }
    if !p.is_empty() {
        p.sort_by_key(|x| x.line);
        return Err(p);
    }
    Ok(Checked {
        file,
        secret: secret.expect("no problems means a secret"),
        warnings,
    })
}

type Val<'i> = Raw<'i>;

fn span_in(outer: &std::ops::Range<usize>, inner: &std::ops::Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The key path (`node[2].match.mac`) of the value at `span` below `v`, and the table keys
/// that lead to it (what to remove to get past the problem).
fn locate(v: &Val<'_>, span: &std::ops::Range<usize>, path: &mut String, keys: &mut Vec<String>) {
    match v.get_ref() {
        toml::de::DeValue::Table(t) => {
            for (k, child) in t.iter() {
                let in_value = span_in(&child.span(), span);
                if in_value || span_in(&k.span(), span) {
                    path.push('.');
                    path.push_str(k.get_ref());
                    keys.push(k.get_ref().to_string());
                    if in_value {
                        locate(child, span, path, keys);
                    }
                    return;
                }
            }
        }
        toml::de::DeValue::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                if span_in(&child.span(), span) {
                    path.push_str(&format!("[{i}]"));
                    // Array elements are not removed one by one: the key holding the array is.
                    locate(child, span, path, &mut Vec::new());
                    return;
                }
            }
        }
        _ => {}
    }
}

fn remove_key(v: &mut Val<'_>, keys: &[String]) -> bool {
    let toml::de::DeValue::Table(t) = v.get_mut() else {
        return false;
    };
    match keys {
        [] => false,
        [last] => t.remove(last.as_str()).is_some(),
        [first, rest @ ..] => t
            .get_mut(first.as_str())
            .is_some_and(|child| remove_key(child, rest)),
    }
}

/// Every problem a section (`[network]`, one `[[node]]`, a stack's section) has: deserialises it, and on an
/// error records it with its full key path and line, removes the offending key and tries
/// again, so one run reports all of them.
fn section_problems<T: serde::de::DeserializeOwned>(
    text: &str,
    name: &str,
    value: &Val<'_>,
    p: &mut Vec<Problem>,
) {
    use serde::de::IntoDeserializer;
    let mut v = value.clone();
    let mut removed: Vec<String> = Vec::new();
    for _ in 0..256 {
        let e = match T::deserialize(v.clone().into_deserializer()) {
            Ok(_) => return,
            Err(e) => e,
        };
        let span = e.span().unwrap_or_else(|| v.span());
        let mut path = name.to_owned();
        let mut keys = Vec::new();
        locate(&v, &span, &mut path, &mut keys);
        let msg = e.message().trim().to_owned();
        // A key removed below reappears as a missing field: already reported.
        if let Some(missing) = msg
            .strip_prefix("missing field `")
            .and_then(|m| m.split('`').next())
        {
            if removed.contains(&format!("{path}.{missing}")) {
                return;
            }
        }
        p.push(Problem {
            line: line_of(text, span.start),
            field: path.clone(),
            message: msg,
        });
        if keys.is_empty() || !remove_key(&mut v, &keys) {
            return;
        }
        removed.push(format!("{name}.{}", keys.join(".")));
    }
}

/// The sections the core reads; the stacks' sections come from the registry.
const CORE_SECTIONS: [&str; 7] = [
    "schema",
    "cluster",
    "network",
    "time",
    "user",
    "node",
    "firstboot",
];

/// Parses the file: the stacks' sections by their stacks, the rest as [`ClusterFile`]. On
/// failure, every problem: all syntax errors, else every section's type errors and unknown
/// keys, each with its key path and line.
fn parse(text: &str, stacks: &[&dyn Stack]) -> Result<ClusterFile, Vec<Problem>> {
    use serde::de::IntoDeserializer;
    let (doc, errors) = toml::de::DeTable::parse_recoverable(text);
    if !errors.is_empty() {
        return Err(errors
            .iter()
            .map(|e| Problem {
                line: e.span().map_or(0, |s| line_of(text, s.start)),
                field: "syntax".into(),
                message: e.message().trim().to_owned(),
            })
            .collect());
    }
    let span = doc.span();
    let mut root = doc.into_inner();
    let mut p = Vec::new();
    let mut sections = Sections::default();
    for stack in stacks {
        let Some(name) = stack.section() else {
            continue;
        };
        if let Some(value) = root.remove(name) {
            match stack.parse_section(text, &value) {
                Ok(v) => sections.insert(name, v),
                Err(ps) => p.extend(ps),
            }
        }
    }
    let core: Raw<'_> = Spanned::new(span, toml::de::DeValue::Table(root));
    match ClusterFile::deserialize(core.clone().into_deserializer()) {
        Ok(mut f) if p.is_empty() => {
            f.stacks = sections;
            Ok(f)
        }
        Ok(_) => Err(p),
        Err(e) => {
            p.extend(core_problems(text, &core, &e, stacks));
            p.sort_by_key(|x| x.line);
            Err(p)
        }
    }
}

/// Every problem of the core sections, which do not deserialise. `first` is the error of
/// deserialising them whole, used if nothing more precise is found.
fn core_problems(
    text: &str,
    core: &Raw<'_>,
    first: &toml::de::Error,
    stacks: &[&dyn Stack],
) -> Vec<Problem> {
    let mut p = Vec::new();
    let toml::de::DeValue::Table(root) = core.get_ref() else {
        return p;
    };
    for (key, value) in root.iter() {
        let k = key.get_ref().as_ref();
        match k {
            "schema" => section_problems::<String>(text, k, value, &mut p),
            "cluster" => section_problems::<Cluster>(text, k, value, &mut p),
            "network" => section_problems::<Network>(text, k, value, &mut p),
            "time" => section_problems::<Time>(text, k, value, &mut p),
            "firstboot" => section_problems::<FirstBoot>(text, k, value, &mut p),
            "user" | "node" => match value.get_ref() {
                toml::de::DeValue::Array(items) => {
                    for (i, item) in items.iter().enumerate() {
                        let name = format!("{k}[{i}]");
                        if k == "user" {
                            section_problems::<User>(text, &name, item, &mut p);
                        } else {
                            section_problems::<Node>(text, &name, item, &mut p);
                        }
                    }
                }
                _ => p.push(Problem {
                    line: line_of(text, value.span().start),
                    field: k.to_owned(),
                    message: format!("must be a list of tables: write each as [[{k}]]"),
                }),
            },
            other => {
                let known: Vec<String> = CORE_SECTIONS
                    .iter()
                    .map(|s| match *s {
                        "schema" => "schema".to_owned(),
                        "user" | "node" => format!("[[{s}]]"),
                        _ => format!("[{s}]"),
                    })
                    .chain(
                        stacks
                            .iter()
                            .filter_map(|s| s.section())
                            .map(|s| format!("[{s}]")),
                    )
                    .collect();
                p.push(Problem {
                    line: line_of(text, key.span().start),
                    field: other.to_owned(),
                    message: format!("unknown key `{other}`; the file takes {}", known.join(", ")),
                })
            }
        }
    }
    for required in ["schema", "cluster", "network"] {
        if !root.contains_key(required) {
            p.push(Problem {
                line: 0,
                field: required.into(),
                message: format!(
                    "missing: the file needs `{required}` (`picoimg cluster init` writes a complete file)"
                ),
            });
        }
    }
    if p.is_empty() {
        p.push(Problem {
            line: first.span().map_or(0, |s| line_of(text, s.start)),
            field: "file".into(),
            message: first.message().trim().to_owned(),
        });
    }
    p
}

/// A stack's section parsed as `T` (strict when `T` denies unknown fields), or every problem
/// it has with its full key path (`<section>.<key>`) and line.
pub fn typed_section<T: serde::de::DeserializeOwned>(
    text: &str,
    name: &str,
    value: &Raw<'_>,
) -> Result<T, Vec<Problem>> {
    use serde::de::IntoDeserializer;
    match T::deserialize(value.clone().into_deserializer()) {
        Ok(v) => Ok(v),
        Err(e) => {
            let mut p = Vec::new();
            section_problems::<T>(text, name, value, &mut p);
            if p.is_empty() {
                p.push(Problem {
                    line: e.span().map_or(0, |s| line_of(text, s.start)),
                    field: name.to_owned(),
                    message: e.message().trim().to_owned(),
                });
            }
            Err(p)
        }
    }
}

/// `picoimg.cluster/1` -> (1, 0); `picoimg.cluster/1.2` -> (1, 2).
fn schema_version(s: &str) -> Option<(u32, u32)> {
    let v = s.strip_prefix(SCHEMA_PREFIX)?;
    let (major, minor) = v.split_once('.').unwrap_or((v, "0"));
    Some((major.parse().ok()?, minor.parse().ok()?))
}

fn check_cluster(
    text: &str,
    f: &ClusterFile,
    kept: Option<[u8; 32]>,
    p: &mut Vec<Problem>,
) -> Option<[u8; 32]> {
    let c = f.cluster.get_ref();
    if !is_hostname(c.name.get_ref()) {
        p.push(Problem {
            line: at(text, &c.name),
            field: "cluster.name".into(),
            message: format!(
                "{} must be letters, digits and '-', 1-63 characters",
                quoted(c.name.get_ref())
            ),
        });
    }
    if uuid::Uuid::parse_str(c.id.get_ref()).is_err() {
        p.push(Problem {
            line: at(text, &c.id),
            field: "cluster.id".into(),
            message: "not a UUID; `picoimg cluster init` writes one".into(),
        });
    }
    match &c.secret {
        Some(s) if s.get_ref().trim().is_empty() && kept.is_some() => kept,
        Some(s) if s.get_ref().trim().is_empty() => {
            p.push(Problem {
                line: at(text, s),
                field: "cluster.secret".into(),
                message: "empty: a configured node removed it from this copy; a new node needs \
                          the file with its secret (keep the original, or `picoimg cluster \
                          init` for a new cluster)"
                    .into(),
            });
            None
        }
        None => {
            p.push(Problem {
                line: at(text, &f.cluster),
                field: "cluster.secret".into(),
                message: "missing: every key and token is derived from it; `picoimg cluster init` writes a fresh one".into(),
            });
            None
        }
        Some(s) => match base64::engine::general_purpose::STANDARD.decode(s.get_ref().trim()) {
            Ok(b) if b.len() == 32 => Some(b.try_into().expect("32 bytes")),
            _ => {
                p.push(Problem {
                    line: at(text, s),
                    field: "cluster.secret".into(),
                    message: "must be 32 random bytes in base64 (44 characters); `picoimg cluster init` writes one".into(),
                });
                None
            }
        },
    }
}

/// An IPv4 subnet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    pub fn parse(s: &str) -> Option<Subnet> {
        let (a, l) = s.split_once('/')?;
        let addr: Ipv4Addr = a.parse().ok()?;
        let prefix: u8 = l.parse().ok().filter(|p| *p <= 30)?;
        let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
        (u32::from(addr) & !mask == 0).then_some(Subnet {
            network: addr,
            prefix,
        })
    }

    fn mask(self) -> u32 {
        u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0)
    }

    /// Whether `a` is a usable host address of the subnet (not the network or broadcast).
    pub fn host(self, a: Ipv4Addr) -> bool {
        let (n, x) = (u32::from(self.network), u32::from(a));
        x & self.mask() == n && x != n && x != n | !self.mask()
    }

    /// Whether the two networks share an address.
    pub fn overlaps(self, other: Subnet) -> bool {
        let mask = self.mask().min(other.mask());
        u32::from(self.network) & mask == u32::from(other.network) & mask
    }

    /// The `i`-th host address (1-based).
    pub fn nth(self, i: u32) -> Option<Ipv4Addr> {
        let a = Ipv4Addr::from(u32::from(self.network) + i);
        self.host(a).then_some(a)
    }
}

fn check_network(text: &str, f: &ClusterFile, p: &mut Vec<Problem>) -> Option<Subnet> {
    let n = &f.network;
    let subnet = Subnet::parse(n.subnet.get_ref());
    if subnet.is_none() {
        p.push(Problem {
            line: at(text, &n.subnet),
            field: "network.subnet".into(),
            message: format!(
                "\"{}\" is not an IPv4 subnet like \"10.42.0.0/24\" (network address, prefix up to /30)",
                n.subnet.get_ref()
            ),
        });
    }
    match (n.gateway.get_ref().parse::<Ipv4Addr>(), subnet) {
        (Ok(g), Some(s)) if !s.host(g) => p.push(Problem {
            line: at(text, &n.gateway),
            field: "network.gateway".into(),
            message: format!("{g} is not an address in {}", n.subnet.get_ref()),
        }),
        (Err(_), _) => p.push(Problem {
            line: at(text, &n.gateway),
            field: "network.gateway".into(),
            message: format!("\"{}\" is not an IPv4 address", n.gateway.get_ref()),
        }),
        _ => {}
    }
    for (i, d) in n.dns.iter().enumerate() {
        if d.get_ref().parse::<std::net::IpAddr>().is_err() {
            p.push(Problem {
                line: at(text, d),
                field: format!("network.dns[{i}]"),
                message: format!("\"{}\" is not an IP address", d.get_ref()),
            });
        }
    }
    for (i, n) in n.ntp.iter().enumerate() {
        let v = n.get_ref();
        if v.parse::<std::net::IpAddr>().is_err() && !is_dns_name(v) {
            p.push(Problem {
                line: at(text, n),
                field: format!("network.ntp[{i}]"),
                message: format!(
                    "{} is neither an IP address nor a host name (letters, digits, '-' and dots)",
                    quoted(v)
                ),
            });
        }
    }
    subnet
}

/// A value quoted for a message, with control characters made visible.
fn quoted(s: &str) -> String {
    format!("{s:?}")
}

/// A DNS host name: dot-separated labels of letters, digits and '-', at most 253 characters.
pub fn is_dns_name(s: &str) -> bool {
    let s = s.strip_suffix('.').unwrap_or(s);
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_hostname)
}

/// User names that are system accounts or groups on Debian-based images (base-passwd's static
/// list and the accounts the base image's packages create; each stack adds its service users
/// through `Stack::accounts`): a cluster user of that name would take over, or fail to create,
/// a system account.
const SYSTEM_NAMES: &[&str] = &[
    "root",
    "daemon",
    "bin",
    "sys",
    "sync",
    "games",
    "man",
    "lp",
    "mail",
    "news",
    "uucp",
    "proxy",
    "www-data",
    "backup",
    "list",
    "irc",
    "gnats",
    "nobody",
    "nogroup",
    "messagebus",
    "sshd",
    "polkitd",
    "tss",
    "dnsmasq",
    "avahi",
    "statd",
    "adm",
    "tty",
    "disk",
    "kmem",
    "dialout",
    "fax",
    "voice",
    "cdrom",
    "floppy",
    "tape",
    "sudo",
    "audio",
    "dip",
    "operator",
    "src",
    "shadow",
    "utmp",
    "video",
    "sasl",
    "plugdev",
    "staff",
    "users",
    "input",
    "sgx",
    "kvm",
    "render",
    "netdev",
    "crontab",
];

fn system_account(name: &str, stacks: &[&dyn Stack]) -> bool {
    SYSTEM_NAMES.contains(&name)
        || stacks.iter().any(|s| s.accounts().contains(&name))
        || name.starts_with("systemd-")
        || name.starts_with('_')
}

/// Numbers that end up as waits: bounded, so a typo does not wait for years (or overflow).
fn check_limits(text: &str, f: &ClusterFile, p: &mut Vec<Problem>) {
    const DAY: u64 = 86_400;
    if f.time.timeout > DAY {
        p.push(Problem {
            line: find_line(text, "timeout"),
            field: "time.timeout".into(),
            message: format!("{} seconds: give at most {DAY} (a day)", f.time.timeout),
        });
    }
    let h = f.firstboot.health_timeout;
    if h == 0 || h > DAY {
        p.push(Problem {
            line: find_line(text, "health_timeout"),
            field: "firstboot.health_timeout".into(),
            message: format!("{h} seconds: give 1 to {DAY} (a day)"),
        });
    }
}

/// The first line that sets `key` (for values deserialised without a span).
fn find_line(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with('='))
        })
        .map_or(0, |i| i + 1)
}

fn check_users(text: &str, f: &ClusterFile, stacks: &[&dyn Stack], p: &mut Vec<Problem>) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, u) in f.users.iter().enumerate() {
        let name = u.name.get_ref();
        if let Some(first) = seen.insert(name, at(text, &u.name)) {
            p.push(Problem {
                line: at(text, &u.name),
                field: format!("user[{i}].name"),
                message: format!("duplicate user \"{name}\" (also on line {first})"),
            });
        }
        if system_account(name, stacks) {
            p.push(Problem {
                line: at(text, &u.name),
                field: format!("user[{i}].name"),
                message: format!(
                    "\"{name}\" is a system account or group name: pick a personal name such as \"pico\""
                ),
            });
        } else if !is_username(name) {
            p.push(Problem {
                line: at(text, &u.name),
                field: format!("user[{i}].name"),
                message: format!(
                    "{} is not a valid user name (lowercase letters, digits, '-', '_')",
                    quoted(name)
                ),
            });
        }
        for (k, key) in u.ssh_keys.iter().enumerate() {
            if let Err(why) = ssh_public_key(key.get_ref()) {
                p.push(Problem {
                    line: at(text, key),
                    field: format!("user[{i}].ssh_keys[{k}]"),
                    message: format!("malformed SSH public key: {why}"),
                });
            }
        }
    }
}

/// Checks an OpenSSH public key line: known type, base64 body that starts with the same type.
pub fn ssh_public_key(line: &str) -> Result<(), String> {
    const TYPES: [&str; 6] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
    ];
    if let Some(c) = line.chars().find(|c| c.is_control() && *c != '\t') {
        return Err(format!(
            "contains the control character {c:?}: give one key per entry, on one line"
        ));
    }
    let mut parts = line.split_whitespace();
    let kind = parts.next().ok_or("empty")?;
    if !TYPES.contains(&kind) {
        return Err(format!(
            "unknown key type `{kind}` (expected one of {})",
            TYPES.join(", ")
        ));
    }
    let body = parts.next().ok_or("no key data after the type")?;
    let blob = base64::engine::general_purpose::STANDARD
        .decode(body)
        .map_err(|_| "the key data is not base64".to_owned())?;
    let n = blob
        .get(..4)
        .map(|b| u32::from_be_bytes(b.try_into().expect("4")) as usize);
    if n.and_then(|n| blob.get(4..4 + n)) != Some(kind.as_bytes()) {
        return Err(format!("the key data is not a `{kind}` key"));
    }
    Ok(())
}

fn check_nodes(
    text: &str,
    f: &ClusterFile,
    subnet: Option<Subnet>,
    stacks: &[&dyn Stack],
    p: &mut Vec<Problem>,
) {
    if f.nodes.is_empty() {
        p.push(Problem {
            line: 0,
            field: "node".into(),
            message: "no [[node]]: list every node of the cluster".into(),
        });
        return;
    }
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    let mut addrs: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
    let mut macs: BTreeMap<String, usize> = BTreeMap::new();
    let gateway = f.network.gateway.get_ref().parse::<Ipv4Addr>().ok();
    let known: Vec<&str> = stacks
        .iter()
        .flat_map(|s| s.roles().iter().copied())
        .collect();
    for (i, n) in f.nodes.iter().enumerate() {
        let name = n.name.get_ref();
        if !is_hostname(name) {
            p.push(Problem {
                line: at(text, &n.name),
                field: format!("node[{i}].name"),
                message: format!(
                    "{} must be a host name: letters, digits and '-', 1-63 characters",
                    quoted(name)
                ),
            });
        }
        // Host names ignore case: `pc0` and `PC0` are one name on the network.
        if let Some(first) = names.insert(name.to_ascii_lowercase(), at(text, &n.name)) {
            p.push(Problem {
                line: at(text, &n.name),
                field: format!("node[{i}].name"),
                message: format!(
                    "duplicate node name \"{name}\" (also on line {first}; host names ignore case)"
                ),
            });
        }
        if let Some(m) = &n.matcher {
            check_match(text, i, m, p);
        }
        if let Some(b) = &n.board {
            let v = b.get_ref();
            if v.is_empty()
                || !v
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            {
                p.push(Problem {
                    line: at(text, b),
                    field: format!("node[{i}].board"),
                    message: format!(
                        "{} is not a board name (`picoimg boards` lists them: h4, c5, ...)",
                        quoted(v)
                    ),
                });
            }
        }
        let address = n.address.get_ref();
        if address != "dhcp" {
            match address.parse::<Ipv4Addr>() {
                Err(_) => p.push(Problem {
                    line: at(text, &n.address),
                    field: format!("node[{i}].address"),
                    message: format!("\"{address}\" is neither an IPv4 address nor \"dhcp\""),
                }),
                Ok(a) => {
                    if let Some(s) = subnet.filter(|s| !s.host(a)) {
                        p.push(Problem {
                            line: at(text, &n.address),
                            field: format!("node[{i}].address"),
                            message: format!(
                                "{a} is outside the subnet {}/{} (or is its network or broadcast address)",
                                s.network, s.prefix
                            ),
                        });
                    }
                    if Some(a) == gateway {
                        p.push(Problem {
                            line: at(text, &n.address),
                            field: format!("node[{i}].address"),
                            message: format!("{a} is the gateway's address"),
                        });
                    }
                    if let Some(first) = addrs.insert(a, at(text, &n.address)) {
                        p.push(Problem {
                            line: at(text, &n.address),
                            field: format!("node[{i}].address"),
                            message: format!("duplicate address {a} (also on line {first})"),
                        });
                    }
                }
            }
        }
        if let Some(mac) = n.matcher.as_ref().and_then(|m| m.mac.as_ref()) {
            match normalise_mac(mac.get_ref()) {
                None => p.push(Problem {
                    line: at(text, mac),
                    field: format!("node[{i}].match.mac"),
                    message: format!(
                        "{} is not a MAC address like \"52:54:00:12:34:56\"",
                        quoted(mac.get_ref())
                    ),
                }),
                Some(m) if mac_kind_problem(&m).is_some() => p.push(Problem {
                    line: at(text, mac),
                    field: format!("node[{i}].match.mac"),
                    message: format!(
                        "{m} is {}: give the address of the node's network port",
                        mac_kind_problem(&m).unwrap_or_default()
                    ),
                }),
                Some(m) => {
                    if let Some(first) = macs.insert(m.clone(), at(text, mac)) {
                        p.push(Problem {
                            line: at(text, mac),
                            field: format!("node[{i}].match.mac"),
                            message: format!("duplicate MAC {m} (also on line {first})"),
                        });
                    }
                }
            }
        }
        // No roles is allowed: such a node gets the base steps only (a `base` image).
        let mut seen_roles = Vec::new();
        for r in &n.roles {
            let role = r.get_ref().as_str();
            if !known.contains(&role) {
                p.push(Problem {
                    line: at(text, r),
                    field: format!("node[{i}].roles"),
                    message: format!(
                        "unknown role {}: this picoimg knows {}",
                        quoted(role),
                        known.join(", ")
                    ),
                });
            } else if seen_roles.contains(&role) {
                p.push(Problem {
                    line: at(text, r),
                    field: format!("node[{i}].roles"),
                    message: format!("role {role} is listed twice"),
                });
            }
            seen_roles.push(role);
        }
    }
}

/// Why a (normalised) MAC cannot be a node's port: all zeros, broadcast or multicast.
fn mac_kind_problem(m: &str) -> Option<&'static str> {
    let first = u8::from_str_radix(&m[..2], 16).ok()?;
    if m == "00:00:00:00:00:00" {
        Some("the zero address")
    } else if m == "ff:ff:ff:ff:ff:ff" {
        Some("the broadcast address")
    } else if first & 1 == 1 {
        Some("a multicast address (its first byte is odd)")
    } else {
        None
    }
}

/// A node's Raspberry Pi serial (hex digits, as in /proc/device-tree/serial-number) and DMI
/// UUID (as in /sys/class/dmi/id/product_uuid).
fn check_match(text: &str, i: usize, m: &Match, p: &mut Vec<Problem>) {
    if let Some(serial) = &m.serial {
        let v = serial.get_ref();
        if v.is_empty() || v.len() > 32 || !v.bytes().all(|b| b.is_ascii_hexdigit()) {
            p.push(Problem {
                line: at(text, serial),
                field: format!("node[{i}].match.serial"),
                message: format!(
                    "{} is not a Raspberry Pi serial number (hex digits, e.g. \"10000000abcdef01\")",
                    quoted(v)
                ),
            });
        }
    }
    if let Some(uuid) = &m.dmi_uuid {
        if uuid::Uuid::parse_str(uuid.get_ref()).is_err() {
            p.push(Problem {
                line: at(text, uuid),
                field: format!("node[{i}].match.dmi_uuid"),
                message: format!(
                    "{} is not a UUID like /sys/class/dmi/id/product_uuid shows",
                    quoted(uuid.get_ref())
                ),
            });
        }
    }
}

/// `52-54-00-AB-CD-EF` or `52:54:00:ab:cd:ef` -> `52:54:00:ab:cd:ef`.
pub fn normalise_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    (parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit())))
    .then(|| parts.join(":").to_ascii_lowercase())
}

fn is_hostname(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn is_username(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

/// Options of `picoimg cluster init`.
pub struct InitOptions<'a> {
    pub name: &'a str,
    pub nodes: u32,
    pub subnet: &'a str,
    /// The stacks whose sections and roles the file gets.
    pub stacks: &'a [&'a dyn Stack],
}

/// A complete, commented cluster file with a fresh id and secret, with the sections and roles
/// of `o.stacks`.
pub fn render_init(o: &InitOptions<'_>) -> Result<String, String> {
    let stacks = o.stacks;
    if !is_hostname(o.name) {
        return Err(format!(
            "--name \"{}\": letters, digits and '-' only",
            o.name
        ));
    }
    if o.nodes == 0 || o.nodes > 250 {
        return Err(format!("--nodes {}: give 1 to 250", o.nodes));
    }
    let subnet = Subnet::parse(o.subnet).ok_or_else(|| {
        format!(
            "--subnet \"{}\": write an IPv4 subnet like 10.42.0.0/24",
            o.subnet
        )
    })?;
    let gateway = subnet.nth(1).ok_or("--subnet is too small")?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness for the secret: {e}"))?;
    let secret = base64::engine::general_purpose::STANDARD.encode(secret);
    let mut idb = [0u8; 16];
    getrandom::fill(&mut idb).map_err(|e| format!("no randomness for the id: {e}"))?;
    let id = uuid::Builder::from_random_bytes(idb).into_uuid();
    let mut s = format!(
        r#"# picoimg cluster file: every node of the cluster boots the same image and reads this file
# from its boot partition (picoimg/cluster.toml). Check it with `picoimg cluster check FILE`.
schema = "{SCHEMA}"

[cluster]
name = "{name}"
id = "{id}"
# 32 random bytes: every key and token (gossip keys, ACL tokens, ...) is derived from it.
# Keep this file private; nodes remove the secret from the boot partition once applied.
secret = "{secret}"

[network]
subnet = "{subnet_s}"
gateway = "{gateway}"
dns = ["{gateway}"]
# NTP servers; empty: those DHCP offers, else the distribution's defaults.
ntp = []

[time]
# Before cluster steps, wait up to `timeout` seconds for a synchronised clock. "sync": then go
# on with a warning; "require": then fail; "skip": do not wait (no time source at all).
policy = "sync"
timeout = 180

# Who may log in (SSH keys only; there are no passwords). Add your public key:
# [[user]]
# name = "pico"
# ssh_keys = ["ssh-ed25519 AAAA... you@laptop"]
# sudo = true

{sections}[firstboot]
# Remove the secret from the boot partition's copy once a node has applied the file.
scrub_secret = true
# Seconds a node waits for its cluster services to be healthy before it reports failure.
health_timeout = 900
"#,
        name = o.name,
        subnet_s = o.subnet,
        sections = stacks
            .iter()
            .filter_map(|s| s.init_section())
            .map(|t| format!("{}\n\n", t.trim_end()))
            .collect::<String>(),
    );
    for i in 0..o.nodes {
        let addr = subnet.nth(10 + i).ok_or_else(|| {
            format!(
                "--subnet {} has no room for {} nodes from .10",
                o.subnet, o.nodes
            )
        })?;
        let roles: Vec<String> = stacks
            .iter()
            .flat_map(|s| s.init_roles(i, o.nodes))
            .map(|r| format!("\"{r}\""))
            .collect();
        s.push_str(&format!(
            r#"
[[node]]
name = "pc{i}"
address = "{addr}"   # or "dhcp"
roles = [{roles}]
# board = "h4"   # in a cluster of several boards: which board's image this node runs
# How the node finds itself if flashing did not name it (picoimg flash --node) and the kernel
# command line has no picoimg.node=: by MAC address, Raspberry Pi serial, or DMI product UUID.
# match = {{ mac = "52:54:00:00:00:{:02x}" }}
"#,
            i + 1,
            roles = roles.join(", "),
        ));
    }
    Ok(s)
}

/// The file as a node leaves it on the boot partition: the secret's value emptied, everything
/// else (comments, order) as written.
pub fn scrubbed(text: &str, file: &ClusterFile) -> String {
    with_secret(text, file, "")
}

/// The file with the secret's value set to `secret` (base64), everything else as written.
pub fn with_secret(text: &str, file: &ClusterFile, secret: &str) -> String {
    match &file.cluster.get_ref().secret {
        Some(s) => {
            let span = s.span();
            format!("{}\"{secret}\"{}", &text[..span.start], &text[span.end..])
        }
        None => text.to_owned(),
    }
}

/// What identifies one version of a cluster file: sha256 of its scrubbed text, so the file
/// before and after a node scrubs its secret has the same fingerprint.
pub fn fingerprint(text: &str, file: &ClusterFile) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(scrubbed(text, file).as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn init(nodes: u32) -> String {
        render_init(&InitOptions {
            name: "lab",
            nodes,
            subnet: "10.42.0.0/24",
            stacks: &crate::stacks::named(&["consul"]),
        })
        .unwrap()
    }

    fn problems(text: &str) -> Vec<Problem> {
        check(text).err().unwrap_or_default()
    }

    fn line_with(text: &str, needle: &str) -> usize {
        text.lines().position(|l| l.contains(needle)).unwrap() + 1
    }

    #[test]
    fn init_output_checks_clean_and_has_a_fresh_secret() {
        let a = init(3);
        let b = init(3);
        let checked = check(&a).unwrap();
        assert_eq!(checked.file.nodes.len(), 3);
        assert!(checked.warnings.is_empty());
        assert_ne!(
            check(&b).unwrap().secret,
            checked.secret,
            "secrets must be fresh"
        );
        for n in [1, 2, 4, 5, 7] {
            check(&init(n)).unwrap_or_else(|p| panic!("init {n} nodes: {p:?}"));
        }
    }

    #[test]
    fn duplicates_are_named_with_lines() {
        let t = init(3)
            .replace("name = \"pc1\"", "name = \"pc0\"")
            .replace("address = \"10.42.0.12\"", "address = \"10.42.0.10\"")
            .replace(
                "# match = { mac = \"52:54:00:00:00:01\" }",
                "match = { mac = \"52:54:00:00:00:aa\" }",
            )
            .replace(
                "# match = { mac = \"52:54:00:00:00:02\" }",
                "match = { mac = \"52-54-00-00-00-AA\" }",
            );
        let p = problems(&t);
        let dup_name = p
            .iter()
            .find(|x| x.message.contains("duplicate node name"))
            .unwrap();
        let second = t
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains("name = \"pc0\""))
            .nth(1)
            .unwrap()
            .0
            + 1;
        assert_eq!(dup_name.line, second);
        assert!(p
            .iter()
            .any(|x| x.message.contains("duplicate address 10.42.0.10")));
        let dup_mac = p
            .iter()
            .find(|x| x.message.contains("duplicate MAC"))
            .unwrap();
        assert_eq!(dup_mac.field, "node[1].match.mac");
        assert_eq!(dup_mac.line, line_with(&t, "52-54-00-00-00-AA"));
    }

    #[test]
    fn address_outside_subnet_and_even_servers() {
        let t = init(4)
            .replace("address = \"10.42.0.11\"", "address = \"10.43.0.11\"")
            .replace("roles = [\"consul-client\"]", "roles = [\"consul-server\"]");
        let p = problems(&t);
        let out = p.iter().find(|x| x.field == "node[1].address").unwrap();
        assert_eq!(out.line, line_with(&t, "10.43.0.11"));
        assert!(out.message.contains("outside the subnet"));
        assert!(p.iter().any(|x| x
            .message
            .contains("4 consul-server nodes: use an odd number")));
    }

    #[test]
    fn no_server_and_missing_secret() {
        let t = init(1).replace("consul-server", "consul-client");
        assert!(problems(&t)
            .iter()
            .any(|x| x.message.contains("no node has the consul-server role")));
        let start = init(1);
        let secret_line = start
            .lines()
            .find(|l| l.starts_with("secret = "))
            .unwrap()
            .to_owned();
        let t = start.replace(&secret_line, "");
        let p = problems(&t);
        let m = p.iter().find(|x| x.field == "cluster.secret").unwrap();
        assert!(m.message.contains("missing"), "{m}");
        assert_eq!(m.line, line_with(&t, "[cluster]"));
    }

    #[test]
    fn malformed_key_and_secret() {
        let t = init(1).replace(
            "# [[user]]\n# name = \"pico\"\n# ssh_keys = [\"ssh-ed25519 AAAA... you@laptop\"]",
            "[[user]]\nname = \"pico\"\nssh_keys = [\"ssh-ed25519 bm90IGEga2V5 me@laptop\"]",
        );
        let p = problems(&t);
        let k = p.iter().find(|x| x.field == "user[0].ssh_keys[0]").unwrap();
        assert!(k.message.contains("malformed SSH public key"), "{k}");
        assert_eq!(k.line, line_with(&t, "ssh_keys = "));
        let good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop";
        assert!(ssh_public_key(good).is_ok());
        let base = init(1);
        let secret_line = base
            .lines()
            .find(|l| l.starts_with("secret"))
            .unwrap()
            .to_owned();
        let t = base.replace(&secret_line, "secret = \"c2hvcnQ=\"");
        assert!(problems(&t)
            .iter()
            .any(|x| x.field == "cluster.secret" && x.message.contains("32 random bytes")));
    }

    #[test]
    fn syntax_error_and_unknown_key_have_lines() {
        let t = init(1).replace("[network]", "[network]\nvlan = 7");
        let p = problems(&t);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].line, line_with(&t, "vlan = 7"));
        assert!(p[0].message.contains("unknown field `vlan`"), "{}", p[0]);
        let t = init(1).replace("datacenter = \"dc1\"", "datacenter = \"dc1");
        let p = problems(&t);
        assert_eq!(p[0].line, line_with(&t, "datacenter = \"dc1"));
    }

    #[test]
    fn schema_versions() {
        let t = init(1).replace(SCHEMA, "picoimg.cluster/2");
        let p = problems(&t);
        assert!(p[0].message.contains("major version 2"), "{}", p[0]);
        let t = init(1).replace(SCHEMA, "picoimg.cluster/1.3");
        let c = check(&t).unwrap();
        assert!(c.warnings[0].message.contains("newer than this picoimg"));
    }

    #[test]
    fn subnets() {
        let s = Subnet::parse("10.42.0.0/24").unwrap();
        assert!(s.host("10.42.0.10".parse().unwrap()));
        assert!(!s.host("10.42.0.255".parse().unwrap()));
        assert!(!s.host("10.42.0.0".parse().unwrap()));
        assert!(Subnet::parse("10.42.0.1/24").is_none(), "host bits set");
        assert_eq!(
            normalise_mac("52-54-00-AB-cd-01").as_deref(),
            Some("52:54:00:ab:cd:01")
        );
    }

    /// Each hostile or mistaken value is refused with its field and line, and nothing else in
    /// the file is blamed for it.
    #[test]
    fn values_are_checked_for_where_they_go() {
        const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl me@laptop";
        let with_user = |user: &str| {
            init(3).replace(
                "# [[user]]\n# name = \"pico\"\n# ssh_keys = [\"ssh-ed25519 AAAA... you@laptop\"]",
                user,
            )
        };
        let mac = |m: &str| {
            init(3).replace(
                "# match = { mac = \"52:54:00:00:00:01\" }",
                &format!("match = {{ mac = \"{m}\" }}"),
            )
        };
        let cases: Vec<(&str, String, &str, &str)> = vec![
            (
                "newline in an SSH key",
                with_user(&format!("[[user]]\nname = \"pico\"\nssh_keys = [\"{KEY}\\nssh-rsa AAAA evil\"]")),
                "user[0].ssh_keys[0]",
                "control character",
            ),
            (
                "newline in an NTP server",
                init(3).replace("ntp = []", "ntp = [\"pool.example\\n[Network]\\nDNS=6.6.6.6\"]"),
                "network.ntp[0]",
                "neither an IP address nor a host name",
            ),
            (
                "datacenter Consul rejects",
                init(3).replace("datacenter = \"dc1\"", "datacenter = \"Main DC\""),
                "consul.datacenter",
                "not a Consul datacenter name",
            ),
            (
                "node names differing in case",
                init(3).replace("name = \"pc1\"", "name = \"PC0\""),
                "node[1].name",
                "host names ignore case",
            ),
            (
                "root as a user",
                with_user(&format!("[[user]]\nname = \"root\"\nssh_keys = [\"{KEY}\"]")),
                "user[0].name",
                "system account",
            ),
            (
                "a systemd account as a user",
                with_user(&format!("[[user]]\nname = \"systemd-network\"\nssh_keys = [\"{KEY}\"]")),
                "user[0].name",
                "system account",
            ),
            (
                "duplicate users",
                with_user(&format!(
                    "[[user]]\nname = \"pico\"\nssh_keys = [\"{KEY}\"]\n[[user]]\nname = \"pico\"\nssh_keys = [\"{KEY}\"]"
                )),
                "user[1].name",
                "duplicate user",
            ),
            ("broadcast MAC", mac("ff:ff:ff:ff:ff:ff"), "node[0].match.mac", "broadcast"),
            ("zero MAC", mac("00:00:00:00:00:00"), "node[0].match.mac", "zero address"),
            ("multicast MAC", mac("01:00:5e:00:00:01"), "node[0].match.mac", "multicast"),
            (
                "Pi serial with a newline",
                init(3).replace(
                    "# match = { mac = \"52:54:00:00:00:01\" }",
                    "match = { serial = \"1000\\n\" }",
                ),
                "node[0].match.serial",
                "not a Raspberry Pi serial",
            ),
            (
                "health timeout of zero",
                init(3).replace("health_timeout = 900", "health_timeout = 0"),
                "firstboot.health_timeout",
                "give 1 to",
            ),
        ];
        for (what, text, field, message) in cases {
            let p = problems(&text);
            let hit = p.iter().find(|x| x.field == field);
            let hit = hit.unwrap_or_else(|| panic!("{what}: no problem for {field}: {p:?}"));
            assert!(hit.message.contains(message), "{what}: {hit}");
            assert!(hit.line > 0, "{what}: no line: {hit}");
            assert_eq!(p.len(), 1, "{what}: other problems too: {p:?}");
        }
    }

    /// Type errors name the full key path and line, and every one of them comes back at once.
    #[test]
    fn type_errors_name_full_paths_all_at_once() {
        let t = init(3)
            .replace("acl = true", "acl = \"yes\"")
            .replace("timeout = 180", "timeout = \"three minutes\"")
            .replace("address = \"10.42.0.11\"", "address = 11")
            .replace("[network]", "[network]\nvlan = 7");
        let p = problems(&t);
        let find = |f: &str| {
            p.iter()
                .find(|x| x.field == f)
                .unwrap_or_else(|| panic!("no problem for {f}: {p:?}"))
        };
        assert_eq!(find("consul.acl").line, line_with(&t, "acl = \"yes\""));
        assert_eq!(find("time.timeout").line, line_with(&t, "three minutes"));
        assert_eq!(find("node[1].address").line, line_with(&t, "address = 11"));
        assert!(find("network.vlan").message.contains("unknown field"));
        assert_eq!(p.len(), 4, "{p:?}");
        let t = init(1).replace("[consul]", "[consol]");
        let p = problems(&t);
        assert!(
            p.iter()
                .any(|x| x.field == "consol" && x.message.contains("unknown key")),
            "{p:?}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(3000))]
        /// No input makes the parser panic: random text, and the init file with bytes changed.
        #[test]
        fn parser_never_panics_on_random_text(s in "\\PC{0,400}") {
            let _ = check(&s);
        }

        #[test]
        fn parser_never_panics_on_mutated_files(
            edits in proptest::collection::vec((0usize..4000, proptest::char::any()), 1..8)
        ) {
            let mut chars: Vec<char> = init(3).chars().collect();
            for (at, c) in edits {
                let i = at % chars.len();
                chars[i] = c;
            }
            let text: String = chars.into_iter().collect();
            let _ = check(&text);
        }
    }
}
