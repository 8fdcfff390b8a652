//! The K3s stack against a fake system: config.yaml key by key for a server that founds, a
//! server that joins and an agent (keys checked against k3s-io/k3s pkg/cli/cmds/server.go and
//! agent.go, commit 005499a9 of the stored snapshot; `disable` items against
//! pkg/cli/cmds/stage.go), the initialiser rule and its decisions (first boot, a re-flashed
//! first server, a joiner waiting for its turn), the cluster-file rules, and the health check
//! reading `kubectl get nodes -o json`. No K3s binary is reachable here: what K3s itself does
//! with these files is not tested.

use std::path::Path;

use super::*;
use crate::agent::fake::Fake;
use crate::agent::{Agent, Outcome};
use crate::cluster::{render_init, InitOptions};

const RELEASE: &str = "v1.31.4+k3s1";

fn text(nodes: u32) -> String {
    let mut t = render_init(&InitOptions {
        name: "lab",
        nodes,
        subnet: "10.42.0.0/24",
        stacks: &crate::stacks::named(&["k3s"]),
    })
    .unwrap()
    .replace("policy = \"sync\"", "policy = \"skip\"");
    for i in 1..=nodes {
        t = t.replace(
            &format!("# match = {{ mac = \"52:54:00:00:00:{i:02}\" }}"),
            &format!("match = {{ mac = \"52:54:00:00:00:{i:02}\" }}"),
        );
    }
    t
}

use crate::stacks::testing::{checked, mode, problems, secrets};

#[test]
fn init_gives_three_servers_then_agents_and_the_file_checks() {
    let t = text(5);
    assert!(t.contains("[k3s]\n"), "{t}");
    let c = checked(&t);
    let roles: Vec<_> = c.file.nodes.iter().map(config::role).collect();
    assert_eq!(
        roles,
        [
            Some(Role::Server),
            Some(Role::Server),
            Some(Role::Server),
            Some(Role::Agent),
            Some(Role::Agent)
        ]
    );
    assert_eq!(
        config::initialiser(&c.file).unwrap().name.get_ref(),
        "pc0",
        "the first k3s-server in file order"
    );
    let c = checked(&text(1));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.message.starts_with("one k3s-server")),
        "{:#?}",
        c.warnings
    );
}

#[test]
fn tokens_are_hex_never_the_bootstrap_token_shape_and_agents_get_their_own() {
    let c = checked(&text(3));
    let s = secrets(&c);
    let (token, agent) = (
        s.get(label::TOKEN).unwrap(),
        s.get(label::AGENT_TOKEN).unwrap(),
    );
    for v in [token, agent] {
        assert_eq!(v.len(), 64);
        assert!(v.bytes().all(|b| b.is_ascii_hexdigit()), "{v}");
        assert!(!v.contains('.'), "read as a bootstrap token: {v}");
    }
    assert_ne!(token, agent);
}

/// Every key of each config.yaml: a server founding the cluster, a server joining, an agent.
#[test]
fn config_yaml_key_by_key_for_init_join_and_agent() {
    let t = text(4)
        .replace(
            "# disable = [\"traefik\"]\n# tls_san = [\"k3s.example.lan\"]",
            "disable = [\"traefik\", \"servicelb\"]\ntls_san = [\"k3s.lab.lan\", \"10.42.0.100\"]",
        )
        .replace(
            "cluster_cidr = \"10.52.0.0/16\"",
            "cluster_cidr = \"10.60.0.0/16\"",
        );
    let c = checked(&t);
    let s = secrets(&c);
    let (token, agent) = (
        s.get(label::TOKEN).unwrap(),
        s.get(label::AGENT_TOKEN).unwrap(),
    );
    let n = &c.file.nodes;
    let init = config::render(&c.file, &n[0], &s, &Mode::Init).unwrap();
    assert_eq!(
        init,
        format!(
            "# Written by picoimg-firstboot from the cluster file; K3s reads it at start.\n\
             node-name: \"pc0\"\n\
             node-ip: \"10.42.0.10\"\n\
             cluster-init: true\n\
             token: \"{token}\"\n\
             agent-token: \"{agent}\"\n\
             cluster-cidr: \"10.60.0.0/16\"\n\
             service-cidr: \"10.43.0.0/16\"\n\
             cluster-domain: \"cluster.local\"\n\
             disable:\n  - \"traefik\"\n  - \"servicelb\"\n\
             tls-san:\n  - \"k3s.lab.lan\"\n  - \"10.42.0.100\"\n\
             write-kubeconfig-mode: \"0600\"\n"
        )
    );
    let join = config::render(&c.file, &n[1], &s, &Mode::Join("10.42.0.10".into())).unwrap();
    // Joining nodes carry the full token, `K10<sha256 of server-ca.crt>::server:<password>`
    // (k3s pkg/clientaccess/token.go); `the_founder_places_the_derived_cas_...` checks the hash
    // against the file with sha256sum.
    let hash = pki::ca_hash(
        &pki::ca_cert_pem(&pki::server_ca(), s.get(pki::server_ca().label).unwrap()).unwrap(),
    );
    let expect = init
        .replace("pc0", "pc1")
        .replace(
            "10.42.0.10\"\ncluster-init: true",
            "10.42.0.11\"\nserver: \"https://10.42.0.10:6443\"",
        )
        .replace(
            &format!("token: \"{token}\""),
            &format!("token: \"K10{hash}::server:{token}\""),
        );
    assert_eq!(join, expect);
    // The settings K3s requires to match on every server come from the one section.
    let same = |y: &str| -> Vec<String> {
        y.lines()
            .filter(|l| {
                !l.starts_with("node-")
                    && !l.starts_with("server:")
                    && !l.starts_with("cluster-init")
                    && !l.starts_with("token:")
            })
            .map(str::to_owned)
            .collect()
    };
    let third = config::render(&c.file, &n[2], &s, &Mode::Join("10.42.0.11".into())).unwrap();
    assert_eq!(same(&init), same(&join));
    assert_eq!(same(&init), same(&third));
    // An agent: the agent token only, no server settings.
    let a = config::render(&c.file, &n[3], &s, &Mode::Join("10.42.0.10".into())).unwrap();
    assert_eq!(
        a,
        format!(
            "# Written by picoimg-firstboot from the cluster file; K3s reads it at start.\n\
             node-name: \"pc3\"\n\
             node-ip: \"10.42.0.13\"\n\
             server: \"https://10.42.0.10:6443\"\n\
             token: \"K10{hash}::node:{agent}\"\n"
        )
    );
    assert!(!a.contains(token));
}

#[test]
fn the_initialiser_rule_founds_once_and_joins_what_answers() {
    let c = checked(&text(5));
    let f = &c.file;
    let n = &f.nodes;
    let a = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    // The first server founds only when no other server answers.
    assert_eq!(config::decide(f, &n[0], &[]), Some(Mode::Init));
    assert_eq!(
        config::decide(f, &n[0], &a(&["10.42.0.12"])),
        Some(Mode::Join("10.42.0.12".into())),
        "a re-flashed first server joins its running cluster"
    );
    // Its own address is not an answer.
    assert_eq!(
        config::decide(f, &n[0], &a(&["10.42.0.10"])),
        Some(Mode::Init)
    );
    // Everyone else never founds: nobody answering means wait.
    for (i, node) in n.iter().enumerate().skip(1) {
        assert_eq!(config::decide(f, node, &[]), None, "pc{i}");
    }
    // The first server is preferred among those that answer; else the first that answers.
    assert_eq!(
        config::decide(f, &n[2], &a(&["10.42.0.11", "10.42.0.10"])),
        Some(Mode::Join("10.42.0.10".into()))
    );
    assert_eq!(
        config::decide(f, &n[3], &a(&["10.42.0.11"])),
        Some(Mode::Join("10.42.0.11".into()))
    );
    // Servers ask the other servers; agents ask every server.
    assert_eq!(config::peers(f, &n[0]), a(&["10.42.0.11", "10.42.0.12"]));
    assert_eq!(
        config::peers(f, &n[4]),
        a(&["10.42.0.10", "10.42.0.11", "10.42.0.12"])
    );
    // Joins one at a time, in file order.
    let delays: Vec<u64> = n.iter().map(|x| config::join_delay(f, x)).collect();
    assert_eq!(delays, [0, 0, 15, 30, 45]);
}

#[test]
fn cluster_file_rules_have_lines() {
    let t = text(3);
    let line_of = |t: &str, needle: &str| t.lines().position(|l| l.contains(needle)).unwrap() + 1;
    let expect = |t: &str, field: &str, needle: &str, msg: &str| {
        let p = problems(t);
        let line = if needle.is_empty() {
            0
        } else {
            line_of(t, needle)
        };
        assert!(
            p.iter()
                .any(|p| p.field == field && p.line == line && p.message.contains(msg)),
            "{field} {msg}: {p:#?}"
        );
    };
    // Two servers.
    let two = t.replacen("roles = [\"k3s-server\"]", "roles = [\"k3s-agent\"]", 1);
    expect(
        &two,
        "node.roles",
        "",
        "2 k3s-server nodes: use an odd number",
    );
    // No server at all, with agents.
    let none = t.replace("roles = [\"k3s-server\"]", "roles = [\"k3s-agent\"]");
    expect(
        &none,
        "node.roles",
        "",
        "no node has the k3s-server role (agents join a server)",
    );
    // A server on DHCP.
    let dhcp = t.replacen("address = \"10.42.0.11\"", "address = \"dhcp\"", 1);
    expect(
        &dhcp,
        "node[1].address",
        "address = \"dhcp\"",
        "a k3s-server needs a static address",
    );
    // Both roles on one node.
    let both = t.replacen(
        "roles = [\"k3s-server\"]",
        "roles = [\"k3s-server\", \"k3s-agent\"]",
        1,
    );
    expect(&both, "node[0].roles", "name = \"pc0\"", "not both");
    // The section's values.
    let sec = |extra: &str| {
        if extra.starts_with("cluster_cidr") {
            t.replace("cluster_cidr = \"10.52.0.0/16\"", extra)
        } else {
            t.replace("[k3s]\n", &format!("[k3s]\n{extra}\n"))
        }
    };
    let cases = [
        (
            "version = \"1.31.4\"",
            "k3s.version",
            "not a K3s release name",
        ),
        (
            "cluster_cidr = \"10.42.0.0/33\"",
            "k3s.cluster_cidr",
            "not an IPv4 network",
        ),
        (
            "cluster_cidr = \"10.42.1.0/16\"",
            "k3s.cluster_cidr",
            "not an IPv4 network",
        ),
        (
            "service_cidr = \"10.42.0.0/20\"",
            "k3s.service_cidr",
            "overlaps the nodes' network 10.42.0.0/24",
        ),
        (
            "service_cidr = \"10.52.128.0/17\"",
            "k3s.service_cidr",
            "overlaps cluster_cidr",
        ),
        (
            "cluster_domain = \"bad_domain\"",
            "k3s.cluster_domain",
            "not a DNS domain",
        ),
        (
            "disable = [\"trafik\"]",
            "k3s.disable",
            "one of coredns, servicelb, traefik",
        ),
        (
            "tls_san = [\"bad name\"]",
            "k3s.tls_san",
            "neither a DNS name nor an IPv4 address",
        ),
        ("init_wait = 5", "k3s.init_wait", "between 10 and 3600"),
        ("tokn = \"x\"", "k3s", "unknown field"),
    ];
    for (line, field, msg) in cases {
        let t = sec(line);
        let needle = line.split(" = ").next().unwrap();
        let p = problems(&t);
        assert!(
            p.iter().any(|p| p.field.starts_with(field)
                && p.line == line_of(&t, needle)
                && p.message.contains(msg)),
            "{line}: {p:#?}"
        );
    }
    // K3s's own default pod network overlaps picoimg's default node subnet: said, with the fix.
    let default = t.replace("cluster_cidr = \"10.52.0.0/16\"\n", "");
    expect(
        &default,
        "k3s.cluster_cidr",
        "",
        "K3s's default overlaps the nodes' network 10.42.0.0/24: set [k3s] cluster_cidr to a free range, such as \"10.52.0.0/16\"",
    );
    // So does a file with K3s roles and no [k3s] section at all.
    let bare = default.replace("[k3s]\n", "");
    expect(&bare, "k3s.cluster_cidr", "", "K3s's default overlaps");
    // The defaults pass, and a good section too.
    checked(&sec(
        "version = \"v1.31.4+k3s1\"\nservice_cidr = \"10.96.0.0/12\"\ncluster_domain = \"lab.internal\"\ndisable = [\"traefik\"]\ntls_san = [\"10.42.0.100\", \"k3s.lab\"]\ninit_wait = 300",
    ));
}

/// A node's root as the image leaves it: build info, the cluster file on the boot partition,
/// its MAC, the K3s binary (empty: the fake answers `k3s --version`).
fn node_root(t: &str, mac: &str) -> tempfile::TempDir {
    crate::stacks::testing::node_root(
        "h4-k3s",
        t,
        mac,
        &[
            (BINARY, ""),
            ("etc/passwd", "root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/group", "root:x:0:\n"),
        ],
    )
}

/// `kubectl get nodes -o json` with `ready` of pc0..pc2 Ready and etcd members.
fn nodes_json(ready: &[&str]) -> String {
    let items: Vec<String> = ready
        .iter()
        .map(|n| {
            format!(
                r#"{{"kind":"Node","metadata":{{"name":"{n}","labels":{{"node-role.kubernetes.io/etcd":"true","node-role.kubernetes.io/control-plane":"true"}}}},"status":{{"conditions":[{{"type":"MemoryPressure","status":"False"}},{{"type":"Ready","status":"True"}}]}}}}"#
            )
        })
        .collect();
    format!(
        r#"{{"apiVersion":"v1","kind":"List","items":[{}]}}"#,
        items.join(",")
    )
}

/// A fake node at `addr` whose K3s is RELEASE and whose API lists `ready` Ready.
fn fake_k3s(r: &Path, addr: &'static str, ready: &'static [&'static str]) -> Fake {
    let mut fake = Fake::new(r);
    fake.answer = Box::new(move |line| {
        if line == "ip -o -4 addr show" {
            Some(format!(
                "2: enp0s2    inet {addr}/24 brd 10.42.0.255 scope global enp0s2\n"
            ))
        } else if line == "/usr/local/bin/k3s --version" {
            Some(format!(
                "k3s version {RELEASE} (a1b2c3d4)\ngo version go1.22.9\n"
            ))
        } else if line.starts_with("/usr/local/bin/k3s kubectl") {
            Some(nodes_json(ready))
        } else {
            None
        }
    });
    fake
}

#[test]
fn a_first_server_looks_for_a_running_cluster_then_founds_it() {
    let t = text(3);
    let d = node_root(&t, "52:54:00:00:00:01");
    let r = d.path();
    let fake = fake_k3s(r, "10.42.0.10", &["pc0", "pc1", "pc2"]);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    assert!(a.lines().iter().any(|l| l
        == &format!("picoimg: step k3s ok: K3s {RELEASE} (k3s-server); it starts once the node knows whether to found or join")));
    assert!(
        !r.join(CONFIG).exists(),
        "nothing decided before the health phase"
    );
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    // It asked pc1 and pc2 for the whole init_wait (120 s, every 5 s), then founded.
    let slept: u64 = fake.slept.borrow().iter().sum();
    assert_eq!(slept, 120);
    let asked = fake
        .calls()
        .iter()
        .filter(|c| c.starts_with("connect "))
        .count();
    assert_eq!(asked, 2 * 25, "two servers, 25 looks");
    let conf = std::fs::read_to_string(r.join(CONFIG)).unwrap();
    assert!(conf.contains("\ncluster-init: true\n"), "{conf}");
    assert!(!conf.contains("server:"), "{conf}");
    assert_eq!(mode(&r.join(CONFIG)), 0o600);
    assert!(fake
        .calls()
        .contains(&"systemctl enable --now --no-block k3s.service".to_owned()));
    assert!(
        h.lines().iter().any(|l| l
            == "picoimg: k3s: looking for a running cluster before founding one (0 of 120 s): no other server (10.42.0.11, 10.42.0.12) answers on port 6443"),
        "{:#?}",
        h.lines()
    );
    assert!(h.lines().iter().any(|l| l
        == "picoimg: step health ok: k3s server (founded the cluster): 3 nodes Ready, 3 etcd members"), "{:#?}", h.lines());
    // The token never reaches a command line or a report.
    let c = checked(&t);
    let s = secrets(&c);
    let token = s.get(label::TOKEN).unwrap();
    assert!(!fake.calls().iter().any(|c| c.contains(token)));
    assert!(!h.lines().iter().any(|l| l.contains(token)));
    // A later boot keeps the decision: no looking around, K3s already enabled.
    let fake = fake_k3s(r, "10.42.0.10", &["pc0", "pc1", "pc2"]);
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    assert!(
        !fake
            .calls()
            .iter()
            .any(|c| c.starts_with("connect ") || c.starts_with("systemctl")),
        "{:?}",
        fake.calls()
    );
}

/// `openssl` with `args`: its stdout (the test fails on a non-zero exit).
fn openssl(args: &[&str]) -> String {
    let o = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// The founder writes K3s's five CAs and the service-account key where K3s looks for them
/// (k3s pkg/daemons/control/deps/deps.go: used as they are when both files exist), checked with
/// openssl; a joiner's token carries the SHA-256 of the founder's server-ca.crt (sha256sum), and
/// another derivation gives the same bytes.
#[test]
fn the_founder_places_derived_cas_that_openssl_reads_and_joiners_trust_by_hash() {
    let t = text(3);
    let d = node_root(&t, "52:54:00:00:00:01");
    let r = d.path();
    let fake = fake_k3s(r, "10.42.0.10", &["pc0", "pc1", "pc2"]);
    assert_eq!(Agent::new(r, &fake, false).apply(), Outcome::Configured);
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    let tls = r.join(pki::TLS_DIR);
    let p = |rel: &str| tls.join(rel).to_str().unwrap().to_owned();
    for (file, cn) in [
        ("server-ca", "picoimg-k3s-server-ca"),
        ("client-ca", "picoimg-k3s-client-ca"),
        ("request-header-ca", "picoimg-k3s-request-header-ca"),
        ("etcd/server-ca", "picoimg-etcd-server-ca"),
        ("etcd/peer-ca", "picoimg-etcd-peer-ca"),
    ] {
        let (crt, key) = (p(&format!("{file}.crt")), p(&format!("{file}.key")));
        assert_eq!(mode(Path::new(&crt)), 0o644, "{crt}");
        assert_eq!(mode(Path::new(&key)), 0o600, "{key}");
        let text = openssl(&[
            "x509",
            "-in",
            &crt,
            "-noout",
            "-subject",
            "-issuer",
            "-enddate",
            "-ext",
            "basicConstraints,keyUsage",
        ]);
        assert!(text.contains(&format!("subject=CN = {cn}\n")), "{text}");
        assert!(text.contains(&format!("issuer=CN = {cn}\n")), "{text}");
        assert!(text.contains("notAfter=Dec 31 23:59:59 9999 GMT"), "{text}");
        assert!(text.contains("critical\n    CA:TRUE"), "{text}");
        assert!(text.contains("Certificate Sign"), "{text}");
        // Self-signed: it verifies against itself; its key is the key beside it.
        assert_eq!(
            openssl(&["verify", "-CAfile", &crt, &crt]),
            format!("{crt}: OK\n")
        );
        assert_eq!(
            openssl(&["x509", "-in", &crt, "-noout", "-pubkey"]),
            openssl(&["pkey", "-in", &key, "-pubout"])
        );
        // SEC 1 with the curve named, as Go's x509.ParseECPrivateKey needs.
        assert!(std::fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
        let ec = openssl(&["ec", "-in", &key, "-noout", "-text"]);
        assert!(ec.contains("ASN1 OID: prime256v1"), "{ec}");
        // openssl writes the key it read back byte for byte as the file holds it.
        assert_eq!(
            openssl(&["ec", "-in", &key]),
            std::fs::read_to_string(&key).unwrap()
        );
    }
    let service = p("service.key");
    assert_eq!(mode(Path::new(&service)), 0o600);
    assert!(openssl(&["ec", "-in", &service, "-noout", "-text"]).contains("ASN1 OID: prime256v1"));
    assert!(std::fs::read_to_string(&service)
        .unwrap()
        .starts_with("-----BEGIN EC PRIVATE KEY-----\n"));
    // The joiner's token: K10, then sha256sum of the founder's server-ca.crt.
    let sum = std::process::Command::new("sha256sum")
        .arg(p("server-ca.crt"))
        .output()
        .unwrap();
    let sum = String::from_utf8(sum.stdout).unwrap();
    let sum = sum.split_whitespace().next().unwrap();
    let c = checked(&t);
    let s = secrets(&c);
    let join = config::render(
        &c.file,
        &c.file.nodes[1],
        &s,
        &Mode::Join("10.42.0.10".into()),
    )
    .unwrap();
    assert!(
        join.contains(&format!(
            "\ntoken: \"K10{sum}::server:{}\"\n",
            s.get(label::TOKEN).unwrap()
        )),
        "{join}"
    );
    // Every node derives the same CA: the same file from a second derivation.
    let again = pki::ca_cert_pem(
        &pki::server_ca(),
        secrets(&checked(&t)).get(pki::server_ca().label).unwrap(),
    )
    .unwrap();
    assert_eq!(std::fs::read_to_string(p("server-ca.crt")).unwrap(), again);
    // No key reaches a command line or a report.
    for ca in pki::AUTHORITIES {
        let key = s.get(ca.label).unwrap();
        let body = key.lines().nth(1).unwrap();
        assert!(!fake.calls().iter().any(|c| c.contains(body)));
        assert!(!h.lines().iter().any(|l| l.contains(body)));
    }
}

#[test]
fn a_reflashed_first_server_joins_the_cluster_that_still_runs() {
    let t = text(3);
    let d = node_root(&t, "52:54:00:00:00:01");
    let r = d.path();
    let mut fake = fake_k3s(r, "10.42.0.10", &["pc0", "pc1", "pc2"]);
    // pc2 answers on K3s's port; pc1 does not.
    fake.reachable = Box::new(|host, port, _| host == "10.42.0.12" && port == 6443);
    let mut a0 = Agent::new(r, &fake, false);
    assert_eq!(a0.apply(), Outcome::Configured, "{:#?}", a0.lines());
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    let conf = std::fs::read_to_string(r.join(CONFIG)).unwrap();
    assert!(
        conf.contains("\nserver: \"https://10.42.0.12:6443\"\n"),
        "{conf}"
    );
    assert!(!conf.contains("cluster-init"), "a second cluster: {conf}");
    assert!(
        fake.slept.borrow().is_empty(),
        "no waiting: {:?}",
        fake.slept.borrow()
    );
    assert!(
        h.lines()
            .iter()
            .any(|l| l.contains("k3s server (joined through 10.42.0.12)")),
        "{:#?}",
        h.lines()
    );
}

#[test]
fn a_joining_server_waits_for_a_server_then_for_its_turn() {
    let t = text(3);
    let d = node_root(&t, "52:54:00:00:00:03");
    let r = d.path();
    let mut fake = fake_k3s(r, "10.42.0.12", &["pc0", "pc1", "pc2"]);
    // pc0 answers once 20 s have passed.
    fake.reachable =
        Box::new(|host, _, slept| host == "10.42.0.10" && slept.iter().sum::<u64>() >= 20);
    let mut a0 = Agent::new(r, &fake, false);
    assert_eq!(a0.apply(), Outcome::Configured, "{:#?}", a0.lines());
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    let conf = std::fs::read_to_string(r.join(CONFIG)).unwrap();
    assert!(
        conf.contains("\nserver: \"https://10.42.0.10:6443\"\n"),
        "{conf}"
    );
    // Four looks 5 s apart, then pc2's turn: 15 s after the first joiner.
    let slept = fake.slept.borrow().clone();
    assert_eq!(slept.iter().sum::<u64>(), 20 + 15, "{slept:?}");
    assert!(
        h.lines()
            .iter()
            .any(|l| l == "picoimg: k3s: joining in 15 s (one node at a time, in file order)"),
        "{:#?}",
        h.lines()
    );
    assert!(h.lines().iter().any(|l| l.starts_with("picoimg: waiting for a K3s server to join (0 s): no server answers on port 6443 yet (asked 10.42.0.10, 10.42.0.11)")), "{:#?}", h.lines());
}

#[test]
fn an_agent_joins_with_the_agent_token_and_checks_its_own_node() {
    let t = text(4);
    let d = node_root(&t, "52:54:00:00:00:04");
    let r = d.path();
    let mut fake = fake_k3s(r, "10.42.0.13", &["pc3"]);
    fake.reachable = Box::new(|_, _, _| true);
    let mut a0 = Agent::new(r, &fake, false);
    assert_eq!(a0.apply(), Outcome::Configured, "{:#?}", a0.lines());
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    let c = checked(&t);
    let s = secrets(&c);
    let conf = std::fs::read_to_string(r.join(CONFIG)).unwrap();
    assert!(conf.contains(&format!(
        "::node:{}\"\n",
        s.get(label::AGENT_TOKEN).unwrap()
    )));
    assert!(conf.contains("\ntoken: \"K10"), "{conf}");
    // Only the node that founds the cluster places the CAs.
    assert!(!r.join(pki::TLS_DIR).exists());
    assert!(
        conf.contains("\nserver: \"https://10.42.0.10:6443\"\n"),
        "{conf}"
    );
    assert!(fake
        .calls()
        .contains(&"systemctl enable --now --no-block k3s-agent.service".to_owned()));
    assert!(fake.calls().contains(&format!(
        "/usr/local/bin/k3s kubectl --kubeconfig {KUBELET_KUBECONFIG} get node pc3 -o json"
    )));
    assert!(
        h.lines()
            .iter()
            .any(|l| l
                == "picoimg: step health ok: k3s agent (joined through 10.42.0.10): node Ready"),
        "{:#?}",
        h.lines()
    );
}

#[test]
fn a_server_waits_for_every_server_and_etcd_member_and_gives_up_in_time() {
    let t = text(3).replace("health_timeout = 900", "health_timeout = 60");
    let d = node_root(&t, "52:54:00:00:00:01");
    let r = d.path();
    // The file already decided (a later boot): only pc0 and pc1 ever become Ready.
    let fake = fake_k3s(r, "10.42.0.10", &["pc0", "pc1"]);
    std::fs::create_dir_all(r.join("etc/rancher/k3s")).unwrap();
    std::fs::write(r.join(CONFIG), "cluster-init: true\n").unwrap();
    let mut a0 = Agent::new(r, &fake, false);
    assert_eq!(a0.apply(), Outcome::Configured, "{:#?}", a0.lines());
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Failed);
    let last = h.lines().last().unwrap();
    assert!(
        last.contains(
            "every K3s node Ready not done after 60 s: 2 of 3 nodes Ready (not yet: pc2), 2 of 3 etcd members"
        ),
        "{last}"
    );
    assert!(fake.calls().len() < 30, "bounded: {}", fake.calls().len());
}

#[test]
fn the_image_must_carry_k3s_and_the_pinned_release() {
    let t = text(3).replace("[k3s]\n", "[k3s]\nversion = \"v1.30.2+k3s2\"\n");
    let d = node_root(&t, "52:54:00:00:00:02");
    let r = d.path();
    let fake = fake_k3s(r, "10.42.0.11", &[]);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Failed);
    assert!(
        a.lines().iter().any(|l| l.contains(&format!(
            "the cluster file pins K3s v1.30.2+k3s2 ([k3s] version) but this image has {RELEASE}"
        ))),
        "{:#?}",
        a.lines()
    );
    std::fs::remove_file(r.join(BINARY)).unwrap();
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Failed);
    assert!(a.lines().iter().any(|l| l.contains("the image has no /usr/local/bin/k3s: build it with `--stack k3s`")), "{:#?}", a.lines());
}

#[test]
fn kubectl_json_and_k3s_version_are_read() {
    let list = nodes_json(&["pc0", "pc1"]);
    assert_eq!(
        config::nodes(&list).unwrap(),
        [("pc0".into(), true, true), ("pc1".into(), true, true)]
    );
    let one = r#"{"kind":"Node","metadata":{"name":"pc3","labels":{}},"status":{"conditions":[{"type":"Ready","status":"False"}]}}"#;
    assert_eq!(config::nodes(one).unwrap(), [("pc3".into(), false, false)]);
    assert_eq!(config::nodes("not json"), None);
    assert_eq!(
        config::installed_release("k3s version v1.31.4+k3s1 (a1b2c3d4)\ngo version go1.22.9"),
        Some("v1.31.4+k3s1")
    );
    assert_eq!(config::installed_release("k3s version dev"), None);
    assert!(config::version_ok("v1.33.1+k3s1"));
    for bad in [
        "1.31.4+k3s1",
        "v1.31+k3s1",
        "v1.31.4",
        "v1.31.4+k3s",
        "v1.31.4+rke2r1",
    ] {
        assert!(!config::version_ok(bad), "{bad}");
    }
}
