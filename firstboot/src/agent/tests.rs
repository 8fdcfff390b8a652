use super::*;
use crate::cluster::{check, render_init, InitOptions};
use crate::stacks::consul;
use std::os::unix::fs::PermissionsExt;

const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ0b2RqZ2x0b2RqZ2x0b2RqZ2x0b2RqZ2x0b2RqZ2x0b2Rq pico@laptop";

use super::fake::Fake;

fn cluster_text() -> String {
    render_init(&InitOptions {
        name: "lab",
        nodes: 3,
        subnet: "10.42.0.0/24",
        stacks: &crate::stacks::named(&["consul"]),
    })
    .unwrap()
    .replace(
        "# match = { mac = \"52:54:00:00:00:02\" }",
        "match = { mac = \"52:54:00:00:00:02\" }",
    )
    .replace(
        "# [[user]]\n# name = \"pico\"\n# ssh_keys = [\"ssh-ed25519 AAAA... you@laptop\"]",
        &format!("[[user]]\nname = \"pico\"\nssh_keys = [\"{KEY}\"]"),
    )
    .replace("policy = \"sync\"", "policy = \"skip\"")
}

/// A node's root: an H4-like boot mount, one NIC with pc1's MAC, Consul installed.
fn node_root(text: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let r = d.path();
    let w = |rel: &str, t: &str| {
        let p = r.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, t).unwrap();
    };
    w(
        BUILD_INFO,
        r#"{"name":"h4-consul","boot_mount":"/boot/efi"}"#,
    );
    w("boot/efi/picoimg/cluster.toml", text);
    w("sys/class/net/enp0s2/address", "52:54:00:00:00:02\n");
    w("usr/bin/consul", "");
    w(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/bash\nconsul:x:100:101::/var/lib/consul:/usr/sbin/nologin\n",
    );
    w("etc/group", "root:x:0:\nconsul:x:101:\n");
    d
}

fn secret_strings(text: &str) -> Vec<String> {
    let c = check(text).unwrap();
    let s = Secrets::of(crate::stacks::registry(), &c).redacted();
    // A per-node secret once for every node of the file.
    let declared: usize = crate::stacks::registry()
        .iter()
        .flat_map(|st| st.secrets())
        .map(|x| if x.per_node { c.file.nodes.len() } else { 1 })
        .sum();
    assert_eq!(
        s.len(),
        2 + declared,
        "the cluster secret, the handover key and every declared one"
    );
    s
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn apply_configures_every_step_and_scrubs_the_secret() {
    let text = cluster_text();
    let d = node_root(&text);
    let r = d.path();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    for step in [
        "hostname", "hosts", "network", "users", "time", "consul", "services", "scrub",
    ] {
        assert!(
            a.lines()
                .iter()
                .any(|l| l.starts_with(&format!("picoimg: step {step} ok"))),
            "{step}: {:#?}",
            a.lines()
        );
    }
    assert_eq!(
        std::fs::read_to_string(r.join("etc/hostname")).unwrap(),
        "pc1\n"
    );
    let hosts = std::fs::read_to_string(r.join("etc/hosts")).unwrap();
    assert!(hosts.contains("10.42.0.12\tpc2"), "{hosts}");
    let net = std::fs::read_to_string(r.join(NETWORK_FILE)).unwrap();
    assert!(net.contains("MACAddress=52:54:00:00:00:02"), "{net}");
    assert!(net.contains("Address=10.42.0.11/24"), "{net}");
    // Consul: JSON that the 1.8 agent reads, with the 1.8 key name.
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.join(consul::CONFIG)).unwrap()).unwrap();
    assert_eq!(conf["node_name"], "pc1");
    assert!(conf["acl"]["tokens"]["master"].is_string());
    assert_eq!(mode(&r.join(consul::CONFIG)), 0o640);
    let resolved = std::fs::read_to_string(r.join(consul::RESOLVED_DROPIN)).unwrap();
    assert!(resolved.contains("DNS=127.0.0.1:8600") && resolved.contains("Domains=~consul"));
    // Users: keys only.
    let ak = r.join("home/pico/.ssh/authorized_keys");
    assert_eq!(std::fs::read_to_string(&ak).unwrap().trim(), KEY);
    assert_eq!(mode(&ak), 0o600);
    assert!(std::fs::read_to_string(r.join(SUDOERS))
        .unwrap()
        .contains("pico ALL=(ALL) NOPASSWD:ALL"));
    let calls = fake.calls();
    assert!(calls.contains(&"hostname pc1".to_owned()), "{calls:#?}");
    assert!(
        calls.contains(&"systemctl enable consul.service".to_owned()),
        "{calls:#?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("useradd") && c.contains("'*'")),
        "{calls:#?}"
    );
    // The node keeps a root-only full copy; the boot copy loses its secret but stays valid
    // for this node.
    let saved = r.join(SAVED_COPY);
    assert_eq!(mode(&saved), 0o600);
    let saved_text = std::fs::read_to_string(&saved).unwrap();
    assert_eq!(saved_text, text);
    let boot = std::fs::read_to_string(r.join("boot/efi/picoimg/cluster.toml")).unwrap();
    assert!(boot.contains("secret = \"\""), "{boot}");
    assert!(check(&boot).is_err(), "scrubbed file alone has no secret");
    // Status files: present, and no secret in them or in the lines.
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.join(STATUS_JSON)).unwrap()).unwrap();
    assert_eq!(status["state"], "configured");
    assert_eq!(status["node"], "pc1");
    let txt = std::fs::read_to_string(r.join("boot/efi/picoimg/status.txt")).unwrap();
    assert!(txt.contains("step consul: ok"), "{txt}");
    let json = std::fs::read_to_string(r.join(STATUS_JSON)).unwrap();
    for s in secret_strings(&text) {
        assert!(!txt.contains(&s) && !json.contains(&s) && !boot.contains(&s));
        assert!(a.lines().iter().all(|l| !l.contains(&s)));
        assert!(
            calls.iter().all(|l| !l.contains(&s)),
            "secret on a command line"
        );
    }
}

#[test]
fn rerun_on_a_configured_node_does_nothing() {
    let text = cluster_text();
    let d = node_root(&text);
    let r = d.path();
    assert_eq!(
        Agent::new(r, &Fake::new(r), false).apply(),
        Outcome::Configured
    );
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    let done = a
        .lines()
        .iter()
        .filter(|l| l.ends_with(" ok: already done"))
        .count();
    assert_eq!(done, 7, "{:#?}", a.lines());
    assert!(fake.calls().is_empty(), "{:#?}", fake.calls());
}

#[test]
fn a_power_cut_mid_way_resumes_where_it_stopped() {
    let text = cluster_text();
    let d = node_root(&text);
    let r = d.path();
    // First boot dies at the services step (as if the power went while enabling units).
    let mut broken = Fake::new(r);
    broken.fail = Some("systemctl enable");
    let mut a = Agent::new(r, &broken, false);
    assert_eq!(a.apply(), Outcome::Failed);
    assert!(
        a.lines()
            .iter()
            .any(|l| l.starts_with("picoimg: step services failed:")),
        "{:#?}",
        a.lines()
    );
    assert!(
        a.lines()
            .last()
            .unwrap()
            .starts_with("picoimg: failed: step services"),
        "{:#?}",
        a.lines()
    );
    // The secret stays on the boot partition until the node is configured.
    let boot = std::fs::read_to_string(r.join("boot/efi/picoimg/cluster.toml")).unwrap();
    assert_eq!(boot, text);
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    assert_eq!(
        a.lines()
            .iter()
            .filter(|l| l.ends_with("already done"))
            .count(),
        6
    );
    assert!(a
        .lines()
        .iter()
        .any(|l| l == "picoimg: step services ok: enabled and started consul.service"));
    assert!(!fake
        .calls()
        .iter()
        .any(|c| c.starts_with("useradd") || c.starts_with("hostname")));
}

#[test]
fn a_changed_file_is_applied_only_where_safe() {
    let text = cluster_text();
    let d = node_root(&text);
    let r = d.path();
    assert_eq!(
        Agent::new(r, &Fake::new(r), false).apply(),
        Outcome::Configured
    );
    // The user moves pc1 to another address and adds a key: keys are safe, the address is not.
    let mut changed = std::fs::read_to_string(r.join("boot/efi/picoimg/cluster.toml"))
        .unwrap()
        .replace("10.42.0.11", "10.42.0.21");
    changed = changed.replace(
        &format!("ssh_keys = [\"{KEY}\"]"),
        &format!(
            "ssh_keys = [\"{KEY}\", \"{}\"]",
            KEY.replace("laptop", "desk")
        ),
    );
    std::fs::write(r.join("boot/efi/picoimg/cluster.toml"), &changed).unwrap();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    let line = |s: &str| {
        a.lines()
            .iter()
            .find(|l| l.starts_with(&format!("picoimg: step {s} ")))
            .cloned()
            .unwrap()
    };
    assert!(
        line("network").starts_with("picoimg: step network kept"),
        "{:#?}",
        a.lines()
    );
    assert!(
        line("consul").starts_with("picoimg: step consul kept"),
        "{:#?}",
        a.lines()
    );
    assert!(
        line("users").starts_with("picoimg: step users ok: pico (2 keys)"),
        "{:#?}",
        a.lines()
    );
    assert!(
        line("hosts").starts_with("picoimg: step hosts ok"),
        "{:#?}",
        a.lines()
    );
    assert!(a
        .lines()
        .last()
        .unwrap()
        .contains("not applied on this configured node: network, consul"));
    let net = std::fs::read_to_string(r.join(NETWORK_FILE)).unwrap();
    assert!(net.contains("10.42.0.11/24"), "address untouched: {net}");
}

#[test]
fn validation_errors_start_nothing() {
    // Two servers: an even count.
    let text = cluster_text().replacen(
        "roles = [\"consul-server\"]",
        "roles = [\"consul-client\"]",
        1,
    );
    let d = node_root(&text);
    let r = d.path();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Failed);
    assert!(fake.calls().is_empty(), "{:#?}", fake.calls());
    let last = a.lines().last().unwrap();
    assert!(last.starts_with("picoimg: failed: 1 problem(s) in picoimg/cluster.toml, first cluster.toml: node.roles: 2 consul-server nodes"), "{last}");
    assert!(!r.join(consul::CONFIG).exists() && !r.join(STATE).exists());
    let txt = std::fs::read_to_string(r.join("boot/efi/picoimg/status.txt")).unwrap();
    assert!(txt.contains("state: failed"), "{txt}");
    // A malformed file names its line.
    let d = node_root("schema = \"picoimg.cluster/1\"\n[cluster\nname = 1\n");
    let mut a = Agent::new(d.path(), &fake, false);
    assert_eq!(a.apply(), Outcome::Failed);
    assert!(
        a.lines()
            .iter()
            .any(|l| l.starts_with("picoimg: cluster.toml:2: ")),
        "{:#?}",
        a.lines()
    );
}

#[test]
fn unknown_node_writes_what_it_saw() {
    let d = node_root(&cluster_text());
    let r = d.path();
    std::fs::write(
        r.join("sys/class/net/enp0s2/address"),
        "52:54:00:99:99:99\n",
    )
    .unwrap();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::UnknownNode);
    let seen = std::fs::read_to_string(r.join("boot/efi/picoimg/unknown-node.txt")).unwrap();
    assert!(seen.contains("mac = \"52:54:00:99:99:99\""), "{seen}");
    assert!(a
        .lines()
        .last()
        .unwrap()
        .starts_with("picoimg: failed: this node is not in"));
    assert!(fake.calls().is_empty());
}

/// In a cluster of several boards, a card flashed with another board's image refuses to
/// configure the node it was given to, and says which image to flash; the right board goes on.
#[test]
fn a_node_on_another_boards_image_refuses_to_configure() {
    let text = cluster_text().replace(
        "match = { mac = \"52:54:00:00:00:02\" }",
        "match = { mac = \"52:54:00:00:00:02\" }\nboard = \"c5\"",
    );
    let d = node_root(&text);
    let r = d.path();
    std::fs::write(
        r.join(BUILD_INFO),
        r#"{"name":"h4-consul","boot_mount":"/boot/efi","board":"h4"}"#,
    )
    .unwrap();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Failed);
    let last = a.lines().last().unwrap().clone();
    assert!(
        last.contains("node pc1 is a c5 board, but this card holds an image built for h4"),
        "{last}"
    );
    assert!(fake.calls().is_empty());
    let right = node_root(&text.replace("board = \"c5\"", "board = \"h4\""));
    std::fs::write(
        right.path().join(BUILD_INFO),
        r#"{"name":"h4-consul","boot_mount":"/boot/efi","board":"h4"}"#,
    )
    .unwrap();
    let fake = Fake::new(right.path());
    assert_eq!(
        Agent::new(right.path(), &fake, false).apply(),
        Outcome::Configured
    );
}

#[test]
fn no_cluster_file_leaves_the_node_alone_and_another_cluster_is_refused() {
    let d = node_root("");
    let r = d.path();
    std::fs::remove_file(r.join("boot/efi/picoimg/cluster.toml")).unwrap();
    let fake = Fake::new(r);
    assert_eq!(Agent::new(r, &fake, false).apply(), Outcome::Unconfigured);
    assert!(fake.calls().is_empty());

    let d = node_root(&cluster_text());
    let r = d.path();
    assert_eq!(
        Agent::new(r, &Fake::new(r), false).apply(),
        Outcome::Configured
    );
    // A file of a new cluster (new id and secret) on a configured node.
    std::fs::write(r.join("boot/efi/picoimg/cluster.toml"), cluster_text()).unwrap();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Failed);
    assert!(
        a.lines()
            .last()
            .unwrap()
            .contains("this node was configured for cluster lab"),
        "{:#?}",
        a.lines()
    );
}

#[test]
fn health_waits_for_consul_then_sets_the_dns_policy_once() {
    let text = cluster_text();
    let d = node_root(&text);
    let r = d.path();
    assert_eq!(
        Agent::new(r, &Fake::new(r), false).apply(),
        Outcome::Configured
    );
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.health(), Outcome::Ready, "{:#?}", a.lines());
    assert_eq!(
        a.lines().last().unwrap(),
        "picoimg: ready: node pc1 of cluster lab"
    );
    let calls = fake.calls();
    assert!(
        calls
            .iter()
            .any(|c| c.starts_with("consul acl policy create -name picoimg-dns")),
        "{calls:#?}"
    );
    assert!(
        calls
            .iter()
            .any(|c| c
                .starts_with("consul acl token update -id 00000000-0000-0000-0000-000000000002"))
    );
    let status: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.join(STATUS_JSON)).unwrap()).unwrap();
    assert_eq!(status["state"], "ready");
    // Next boot: health again (the services may take a moment) but no second policy.
    let fake = Fake::new(r);
    assert_eq!(Agent::new(r, &fake, false).health(), Outcome::Ready);
    assert!(!fake.calls().iter().any(|c| c.contains("acl")));
}

#[test]
fn health_gives_up_after_its_timeout() {
    let text = cluster_text().replace("health_timeout = 900", "health_timeout = 10");
    let d = node_root(&text);
    let r = d.path();
    assert_eq!(
        Agent::new(r, &Fake::new(r), false).apply(),
        Outcome::Configured
    );
    let mut fake = Fake::new(r);
    fake.healthy = false;
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.health(), Outcome::Failed);
    let last = a.lines().last().unwrap();
    assert!(
        last.starts_with("picoimg: failed: consul not healthy after 10 s"),
        "{last}"
    );
    assert!(
        last.contains("10.42.0.10, 10.42.0.11, 10.42.0.12"),
        "{last}"
    );
    assert!(fake.calls().len() <= 14, "bounded: {}", fake.calls().len());
}

#[test]
fn a_server_is_ready_only_once_it_votes() {
    // A re-flashed server rejoins with a new node ID and is listed as a non-voter until the
    // leader's autopilot promotes it (seen in the three-VM rehearsal after pc2's re-flash).
    let d = node_root(&cluster_text());
    let r = d.path();
    assert_eq!(
        Agent::new(r, &Fake::new(r), false).apply(),
        Outcome::Configured
    );
    let mut fake = Fake::new(r);
    let polls = std::cell::Cell::new(0);
    fake.answer = Box::new(move |line| {
        (line == "consul operator raft list-peers").then(|| {
            polls.set(polls.get() + 1);
            let pc1 = if polls.get() < 4 { "false" } else { "true" };
            format!(
                "Node  ID  Address  State  Voter  RaftProtocol\n\
                 pc0  a  10.42.0.10:8300  leader  true  3\n\
                 pc1  b  10.42.0.11:8300  follower  {pc1}  3\n\
                 pc2  c  10.42.0.12:8300  follower  true  3\n"
            )
        })
    });
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.health(), Outcome::Ready, "{:#?}", a.lines());
    let lines = a.lines().join("\n");
    assert!(
        lines.contains("this server is not yet a voter"),
        "the wait says why: {lines}"
    );
    let list_peers = fake
        .calls()
        .iter()
        .filter(|c| *c == "consul operator raft list-peers")
        .count();
    assert_eq!(
        list_peers, 4,
        "ready on the first poll that lists it as a voter"
    );
}

#[test]
fn time_policy_require_fails_without_a_clock_and_sync_goes_on() {
    let text = cluster_text()
        .replace("policy = \"skip\"", "policy = \"require\"")
        .replace("timeout = 180", "timeout = 3");
    let d = node_root(&text);
    let r = d.path();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Failed);
    assert!(
        a.lines()
            .iter()
            .any(|l| l.starts_with("picoimg: step time failed: clock not synchronised after 3 s")),
        "{:#?}",
        a.lines()
    );
    let text = text.replace("policy = \"require\"", "policy = \"sync\"");
    let d = node_root(&text);
    let r = d.path();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured);
    let d = node_root(&text);
    let r = d.path();
    std::fs::create_dir_all(r.join("run/systemd/timesync")).unwrap();
    std::fs::write(r.join(TIME_SYNCED), "").unwrap();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured);
    assert!(
        a.lines()
            .iter()
            .any(|l| l == "picoimg: step time ok: clock synchronised (waited 0 s)"),
        "{:#?}",
        a.lines()
    );
}

/// The issue's bad-input list, on a device: `picoimg: failed` with the same line and field
/// `cluster check` names, and no command run (so no service started).
#[test]
fn every_kind_of_bad_file_fails_the_node_with_its_line() {
    let good = cluster_text();
    let secret_line = good
        .lines()
        .find(|l| l.starts_with("secret = "))
        .unwrap()
        .to_owned();
    let cases: Vec<(String, &str)> = vec![
        (good.replace("[network]", "[network"), "cluster.toml:"),
        (
            good.replace("acl = true", "acl = true\nacls = false"),
            "unknown field `acls`",
        ),
        (
            good.replace("picoimg.cluster/1", "picoimg.cluster/2"),
            "cluster.toml:1: schema: picoimg.cluster/2 is major version 2",
        ),
        (
            good.replace(
                "# match = { mac = \"52:54:00:00:00:01\" }",
                "match = { mac = \"52:54:00:00:00:02\" }",
            ),
            "node[1].match.mac: duplicate MAC 52:54:00:00:00:02",
        ),
        (
            good.replace("address = \"10.42.0.12\"", "address = \"10.43.0.12\""),
            "node[2].address: 10.43.0.12 is outside the subnet",
        ),
        (good.replace(&secret_line, ""), "cluster.secret: missing"),
    ];
    for (text, want) in cases {
        let d = node_root(&text);
        let r = d.path();
        let fake = Fake::new(r);
        let mut a = Agent::new(r, &fake, false);
        assert_eq!(a.apply(), Outcome::Failed, "{want}: {:#?}", a.lines());
        let all = a.lines().join("\n");
        assert!(all.contains(want), "want {want}:\n{all}");
        assert!(
            a.lines().last().unwrap().starts_with("picoimg: failed: "),
            "{all}"
        );
        assert!(fake.calls().is_empty(), "{want}: {:#?}", fake.calls());
        assert!(!r.join(consul::CONFIG).exists() && !r.join(STATE).exists());
    }
}

/// A stack registered only here, with a secret of its own that its step and health check
/// try to report: the registry's redaction must catch it everywhere a report goes.
struct Leaky;

const LEAKY_LABEL: &str = "picoimg/v1/leaky/api-key";

impl crate::stack::Stack for Leaky {
    fn name(&self) -> &'static str {
        "leaky"
    }
    fn roles(&self) -> &'static [&'static str] {
        &["leaky-node"]
    }
    fn secrets(&self) -> &'static [crate::stack::SecretSpec] {
        &[crate::stack::SecretSpec {
            name: "leaky-api-key",
            label: LEAKY_LABEL,
            bytes: 24,
            form: crate::stack::Form::Hex,
            operator: false,
            per_node: false,
        }]
    }
    fn check(&self, _: &str, _: &cluster::ClusterFile, _: &mut Vec<cluster::Problem>) {}
    fn init_roles(&self, _: u32, _: u32) -> Vec<&'static str> {
        Vec::new()
    }
    fn steps<'a>(
        &self,
        ctx: &Ctx<'a>,
        _: &Target<'_>,
        _: &mut crate::stack::Memo,
    ) -> anyhow::Result<Vec<crate::stack::Step<'a>>> {
        let key = ctx.secrets.get(LEAKY_LABEL)?.to_owned();
        Ok(vec![crate::stack::Step {
            name: format!("leaky-{key}"),
            input: crate::stack::fingerprint(&[&key]),
            reapply: false,
            apply: Box::new(move |t: &Target<'_>| {
                t.write("etc/leaky.key", &key, 0o600)?;
                Ok(format!("wrote the key {key}"))
            }),
        }])
    }
    fn units(&self, _: &cluster::ClusterFile, _: &cluster::Node) -> Vec<String> {
        vec!["leaky.service".into()]
    }
    fn health(
        &self,
        ctx: &Ctx<'_>,
        _: &Target<'_>,
        p: &mut dyn crate::stack::Progress,
    ) -> anyhow::Result<Option<String>> {
        let key = ctx.secrets.get(LEAKY_LABEL)?;
        p.say(format!("picoimg: leaky key is {key}"));
        p.once("leaky-once", key, &mut || Ok(format!("once with {key}")))?;
        Ok(Some(format!("leaky healthy with {key}")))
    }
}

#[test]
fn a_registered_stacks_new_secret_never_reaches_a_report() {
    let text = cluster_text().replacen(
        "roles = [\"consul-server\"]\n# board = ",
        "roles = [\"consul-server\", \"leaky-node\"]\n# board = ",
        2,
    );
    let d = node_root(&text);
    let r = d.path();
    let stacks: [&dyn Stack; 2] = [&consul::Consul, &Leaky];
    let fake = Fake::new(r);
    let mut a = Agent::with_stacks(r, &fake, false, &stacks);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    let mut lines = a.lines().to_vec();
    let mut h = Agent::with_stacks(r, &fake, false, &stacks);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    lines.extend(h.lines().iter().cloned());
    // The step ran and used the key (the node's own file has it) ...
    let key = std::fs::read_to_string(r.join("etc/leaky.key")).unwrap();
    assert_eq!(key.len(), 48);
    let c = cluster::check_in(&text, None, &stacks).unwrap();
    let id = c.file.cluster.get_ref().id.get_ref();
    assert_eq!(
        key,
        hex::encode(crate::secrets::derive(&c.secret, id, LEAKY_LABEL, 24))
    );
    // ... and every report shows it redacted: console/journal lines, status.json, status.txt.
    let all = lines.join("\n");
    assert!(all.contains("wrote the key <redacted>"), "{all}");
    assert!(all.contains("picoimg: leaky key is <redacted>"), "{all}");
    assert!(all.contains("leaky healthy with <redacted>"), "{all}");
    let json = std::fs::read_to_string(r.join(STATUS_JSON)).unwrap();
    let txt = std::fs::read_to_string(r.join("boot/efi/picoimg/status.txt")).unwrap();
    assert!(txt.contains("<redacted>"), "{txt}");
    for s in Secrets::of(&stacks, &c).redacted() {
        for (what, body) in [
            ("lines", &all),
            ("status.json", &json),
            ("status.txt", &txt),
        ] {
            assert!(!body.contains(&s), "{what} carries a secret:\n{body}");
        }
    }
    assert!(fake
        .calls()
        .contains(&"systemctl enable consul.service leaky.service".to_owned()));
}
