//! The Nomad stack against a fake system: configuration key by key (checked against
//! hashicorp/nomad command/agent/config.go and nomad/structs/config/consul.go, snapshot
//! aa026cc99c), the cluster-file rules, the ACL bootstrap loop, and a whole apply + health.
//! No Nomad binary is reachable here: what Nomad itself does with these is not tested.

use std::cell::Cell;

use super::*;
use crate::agent::fake::Fake;
use crate::agent::http::Reply;
use crate::agent::{Agent, Outcome};
use crate::cluster::{render_init, InitOptions};

/// The part of Consul's `GET /v1/agent/self` answer the stack reads (shape as Consul 1.8.7
/// answers on a booted node: `Config.Version`).
const AGENT_SELF: &str = r#"{"Config":{"Datacenter":"dc1","NodeName":"pc1","Revision":"","Server":true,"Version":"1.8.7"},"Member":{}}"#;

fn text(nodes: u32) -> String {
    render_init(&InitOptions {
        name: "lab",
        nodes,
        subnet: "10.42.0.0/24",
        stacks: &crate::stacks::named(&["consul", "nomad"]),
    })
    .unwrap()
    .replace(
        "# match = { mac = \"52:54:00:00:00:02\" }",
        "match = { mac = \"52:54:00:00:00:02\" }",
    )
    .replace("policy = \"sync\"", "policy = \"skip\"")
}

use crate::stacks::testing::{checked, mode, problems, secrets};

#[test]
fn init_gives_three_servers_that_are_also_clients_and_the_file_checks() {
    let t = text(5);
    assert!(
        t.contains("[nomad]\ndatacenter = \"dc1\"\nregion = \"global\""),
        "{t}"
    );
    let c = checked(&t);
    let roles: Vec<_> = c.file.nodes.iter().map(config::roles).collect();
    assert_eq!(roles.iter().filter(|r| r.server).count(), 3);
    assert!(roles.iter().all(|r| r.client));
    // One server is allowed, with a warning.
    let c = checked(&text(1));
    assert!(
        c.warnings
            .iter()
            .any(|w| w.message.starts_with("one nomad-server")),
        "{:#?}",
        c.warnings
    );
}

#[test]
fn server_client_and_both_render_the_documented_keys() {
    let t = text(3).replacen(
        "roles = [\"consul-server\", \"nomad-server\", \"nomad-client\"]",
        "roles = [\"consul-server\", \"nomad-server\"]",
        1,
    );
    let c = checked(&t);
    let s = secrets(&c);
    let tok = "00000000-0000-0000-0000-00000000abcd";
    // pc0: server only.
    let v = config::config(&c.file, &c.file.nodes[0], &s, tok).unwrap();
    assert_eq!(v["name"], "pc0");
    assert_eq!(v["region"], "global");
    assert_eq!(v["datacenter"], "dc1");
    assert_eq!(v["data_dir"], config::DATA_DIR);
    assert_eq!(v["bind_addr"], "10.42.0.10");
    for k in ["http", "rpc", "serf"] {
        assert_eq!(v["advertise"][k], "10.42.0.10", "advertise.{k}");
    }
    assert_eq!(v["acl"]["enabled"], true);
    assert_eq!(v["consul"]["address"], "127.0.0.1:8500");
    assert_eq!(v["consul"]["token"], tok);
    assert_eq!(v["server"]["enabled"], true);
    assert_eq!(v["server"]["bootstrap_expect"], 3);
    assert_eq!(
        v["server"]["encrypt"],
        s.get(label::GOSSIP).unwrap(),
        "gossip key"
    );
    {
        use base64::Engine;
        let key = base64::engine::general_purpose::STANDARD
            .decode(v["server"]["encrypt"].as_str().unwrap())
            .unwrap();
        assert_eq!(key.len(), 32, "Nomad wants 32 bytes, standard base64");
    }
    assert_eq!(
        v["server"]["server_join"]["retry_join"],
        serde_json::json!(["10.42.0.10", "10.42.0.11", "10.42.0.12"])
    );
    assert!(v.get("client").is_none(), "server only: {v:#}");
    // pc1: server and client (init's default for the first three).
    let v = config::config(&c.file, &c.file.nodes[1], &s, tok).unwrap();
    assert_eq!(v["server"]["enabled"], true);
    assert_eq!(v["client"]["enabled"], true);
    assert_eq!(v["client"]["cni_path"], "/usr/lib/cni");
    assert_eq!(
        v["client"]["server_join"]["retry_join"],
        serde_json::json!(["10.42.0.10", "10.42.0.11", "10.42.0.12"])
    );
    assert!(v.get("plugin").is_none(), "docker defaults: {v:#}");
    // A client only, with privileged containers allowed.
    let t = text(4).replace(
        "region = \"global\"",
        "region = \"global\"\ndocker_privileged = true",
    );
    let c = checked(&t);
    let v = config::config(&c.file, &c.file.nodes[3], &secrets(&c), tok).unwrap();
    assert!(v.get("server").is_none(), "client only: {v:#}");
    assert_eq!(v["client"]["enabled"], true);
    assert_eq!(v["plugin"]["docker"]["config"]["allow_privileged"], true);
}

#[test]
fn cluster_file_rules_have_lines() {
    let find = |t: &str, want: &str| {
        let ps = problems(t);
        ps.into_iter()
            .find(|p| p.message.contains(want) || p.field.contains(want))
            .unwrap_or_else(|| panic!("no problem with {want:?}"))
    };
    let base = text(3);
    let line_of = |t: &str, needle: &str| t.lines().position(|l| l.contains(needle)).unwrap() + 1;
    // Two servers.
    let t = base.replacen(
        "roles = [\"consul-server\", \"nomad-server\", \"nomad-client\"]",
        "roles = [\"consul-server\", \"nomad-client\"]",
        1,
    );
    find(&t, "2 nomad-server nodes: use an odd number");
    // None.
    let t = base.replace("\"nomad-server\", ", "");
    find(&t, "no node has the nomad-server role");
    // A server on DHCP.
    let t = base.replacen("address = \"10.42.0.10\"", "address = \"dhcp\"", 1);
    let p = find(&t, "a nomad-server needs a static address");
    assert_eq!(p.line, line_of(&t, "address = \"dhcp\""));
    // A Nomad node without a Consul agent.
    let t = base.replace(
        "name = \"pc2\"\naddress = \"10.42.0.12\"   # or \"dhcp\"\nroles = [\"consul-server\", \"nomad-server\", \"nomad-client\"]",
        "name = \"pc2\"\naddress = \"10.42.0.12\"   # or \"dhcp\"\nroles = [\"nomad-server\", \"nomad-client\"]",
    );
    let p = find(&t, "also needs a Consul agent");
    assert_eq!(p.line, line_of(&t, "name = \"pc2\""));
    // The section: strict, names checked.
    let t = base.replace("region = \"global\"", "region = \"global\"\nregoin = \"x\"");
    let p = find(&t, "unknown field `regoin`");
    assert_eq!(p.line, line_of(&t, "regoin"));
    let t = base.replace(
        "datacenter = \"dc1\"\nregion",
        "datacenter = \"dc 1\"\nregion",
    );
    let p = find(&t, "nomad.datacenter");
    assert_eq!(p.line, line_of(&t, "\"dc 1\""));
    // An unknown role names the known ones.
    let t = base.replacen("\"nomad-client\"", "\"nomad-agent\"", 1);
    let p = find(&t, "unknown role \"nomad-agent\"");
    assert!(
        p.message.contains("nomad-server, nomad-client"),
        "{}",
        p.message
    );
}

/// A node root with Consul and Nomad installed and pc1's MAC.
fn node_root(t: &str) -> tempfile::TempDir {
    crate::stacks::testing::node_root(
        "h4-nomad",
        t,
        "52:54:00:00:00:02",
        &[
            ("usr/bin/consul", ""),
            ("usr/bin/nomad", ""),
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/bash\nconsul:x:100:101::/var/lib/consul:/usr/sbin/nologin\nnomad:x:102:103::/opt/nomad:/usr/sbin/nologin\n",
            ),
            ("etc/group", "root:x:0:\nconsul:x:101:\nnomad:x:103:\n"),
        ],
    )
}

#[test]
fn apply_then_health_forms_nomad_with_derived_tokens_kept_off_command_lines() {
    let t = text(3);
    let d = node_root(&t);
    let r = d.path();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    let c = checked(&t);
    let s = secrets(&c);
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.join(CONFIG)).unwrap()).unwrap();
    assert_eq!(conf["name"], "pc1");
    assert_eq!(
        conf["consul"]["token"],
        s.get(label::CONSUL_SERVER_SECRET).unwrap()
    );
    assert_eq!(mode(&r.join(CONFIG)), 0o640);
    assert!(a.lines().iter().any(
        |l| l.starts_with("picoimg: step nomad ok: Nomad 1.9.7: /etc/nomad.d/50-picoimg.json")
    ));
    assert!(fake
        .calls()
        .contains(&"systemctl enable consul.service nomad.service".to_owned()));

    // Health: Consul's token for Nomad made over HTTP, then the ACL bootstrap (no leader
    // twice, then done), then members and this client ready.
    let tries = Cell::new(0);
    let mut fake = Fake::new(r);
    let management = s
        .get(crate::stacks::consul::label::MANAGEMENT_TOKEN)
        .unwrap()
        .to_owned();
    let (secret, accessor, root) = (
        s.get(label::CONSUL_SERVER_SECRET).unwrap().to_owned(),
        s.get(label::CONSUL_SERVER_ACCESSOR).unwrap().to_owned(),
        s.get(label::ROOT_TOKEN).unwrap().to_owned(),
    );
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let seen2 = seen.clone();
    fake.http = Box::new(move |req| {
        seen2.borrow_mut().push((
            req.to_string(),
            req.headers
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>(),
            req.body.to_owned(),
        ));
        Ok(match req.path {
            "/v1/agent/self" => Reply {
                status: 200,
                body: AGENT_SELF.into(),
            },
            "/v1/acl/token" | "/v1/acl/policy" => Reply {
                status: 200,
                body: "{}".into(),
            },
            "/v1/acl/bootstrap" => {
                tries.set(tries.get() + 1);
                if tries.get() < 3 {
                    Reply {
                        status: 500,
                        body: "No cluster leader".into(),
                    }
                } else {
                    Reply {
                        status: 200,
                        body: "{}".into(),
                    }
                }
            }
            _ => Reply {
                status: 404,
                body: String::new(),
            },
        })
    });
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    let seen = seen.borrow();
    let token = seen
        .iter()
        .find(|(r, _, _)| r == "PUT http://127.0.0.1:8500/v1/acl/token")
        .expect("token request");
    assert_eq!(token.1, vec![format!("X-Consul-Token={management}")]);
    let body: serde_json::Value = serde_json::from_str(&token.2).unwrap();
    assert_eq!(body["SecretID"], secret.as_str());
    assert_eq!(body["AccessorID"], accessor.as_str());
    assert_eq!(body["Policies"][0]["Name"], CONSUL_SERVER_POLICY);
    let boots: Vec<_> = seen
        .iter()
        .filter(|(r, _, _)| r == "POST http://127.0.0.1:4646/v1/acl/bootstrap")
        .collect();
    assert_eq!(boots.len(), 3, "retried while there was no leader");
    let body: serde_json::Value = serde_json::from_str(&boots[0].2).unwrap();
    assert_eq!(body["BootstrapSecret"], root.as_str());
    let policy = seen
        .iter()
        .find(|(r, _, _)| r == "PUT http://127.0.0.1:8500/v1/acl/policy")
        .expect("policy request");
    assert_eq!(policy.1, vec![format!("X-Consul-Token={management}")]);
    let body: serde_json::Value = serde_json::from_str(&policy.2).unwrap();
    assert_eq!(body["Name"], CONSUL_SERVER_POLICY);
    let rules = body["Rules"].as_str().unwrap();
    // Consul 1.8.7 (what agent/self said) has no `mesh` rule.
    assert!(
        rules.contains("acl = \"write\"") && !rules.contains("mesh"),
        "{rules}"
    );
    let calls = fake.calls();
    // No derived secret on any command line (HTTP requests carry them in body and headers).
    for v in s.redacted() {
        for c in calls
            .iter()
            .filter(|c| !c.starts_with("POST ") && !c.starts_with("PUT "))
        {
            assert!(!c.contains(&v), "secret on a command line: {c}");
        }
        for l in h.lines() {
            assert!(!l.contains(&v), "secret in a line: {l}");
        }
    }
    assert!(
        h.lines().iter().any(|l| l
            == "picoimg: step nomad-consul-server-token ok: Consul token for Nomad servers (policy picoimg-nomad-server, Consul 1.8.7) in place"),
        "{:#?}",
        h.lines()
    );
    let last = h.lines().last().unwrap().clone();
    assert_eq!(last, "picoimg: ready: node pc1 of cluster lab");
    assert!(
        h.lines().iter().any(
            |l| l.starts_with("picoimg: step health ok: consul server: member")
                && l.contains(
                    "; nomad server and client: 3 server(s) alive, leader elected, client ready"
                )
        ),
        "{:#?}",
        h.lines()
    );
    // The next boot: neither the token nor the bootstrap again.
    let fake = Fake::new(r);
    assert_eq!(Agent::new(r, &fake, false).health(), Outcome::Ready);
    assert!(
        !fake.calls().iter().any(|c| c.contains("acl")),
        "{:#?}",
        fake.calls()
    );
}

#[test]
fn made_by_another_node_is_success_and_a_dead_server_times_out() {
    let t = text(3).replace("health_timeout = 900", "health_timeout = 30");
    let d = node_root(&t);
    let r = d.path();
    let fake = Fake::new(r);
    assert_eq!(Agent::new(r, &fake, false).apply(), Outcome::Configured);
    // Another node made the token and bootstrapped first: what Consul 1.8.7 answered when the
    // same token was created twice (seen on a booted node), and Nomad's answer (acl_endpoint.go).
    let mut fake = Fake::new(r);
    fake.http = Box::new(|req| {
        Ok(match req.path {
            "/v1/acl/bootstrap" => Reply {
                status: 400,
                body: "ACL bootstrap already done (reset index: 7)".into(),
            },
            "/v1/acl/token" => Reply {
                status: 500,
                body: "Invalid Token: AccessorID is already in use".into(),
            },
            "/v1/acl/policy" => Reply {
                status: 500,
                body: "Invalid Policy: A Policy with Name \"picoimg-nomad-server\" already exists"
                    .into(),
            },
            _ => Reply {
                status: 404,
                body: String::new(),
            },
        })
    });
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Ready, "{:#?}", h.lines());
    assert!(h
        .lines()
        .iter()
        .any(|l| l == "picoimg: step nomad-acl-bootstrap ok: ACL system already bootstrapped (by another server)"));

    // Another node whose Nomad never answers: bounded by the health timeout.
    let d = node_root(&t);
    let r = d.path();
    assert_eq!(
        Agent::new(r, &Fake::new(r), false).apply(),
        Outcome::Configured
    );
    let mut fake = Fake::new(r);
    fake.http = Box::new(|req| {
        if req.port == 4646 {
            anyhow::bail!("{req}: connection refused")
        }
        Ok(Reply {
            status: 200,
            body: "{}".into(),
        })
    });
    let mut h = Agent::new(r, &fake, false);
    assert_eq!(h.health(), Outcome::Failed);
    let last = h.lines().last().unwrap();
    assert!(
        last.contains("bootstrapping Nomad's ACLs: still failing after 30 s")
            && last.contains("connection refused"),
        "{last}"
    );
    assert!(fake.calls().len() < 40, "bounded: {}", fake.calls().len());
}

#[test]
fn the_cli_tables_are_read_by_their_headers() {
    let members = "Name        Address     Port  Status  Leader  Raft Version  Build  Datacenter  Region\n\
                   pc0.global  10.42.0.10  4648  alive   true    3             1.9.7  dc1         global\n\
                   pc1.global  10.42.0.11  4648  failed  false   3             1.9.7  dc1         global\n";
    assert_eq!(config::servers_alive(members), (1, true));
    let nodes = "ID        Node Pool  DC   Name  Class   Drain  Eligibility  Status\n\
                 1f3b4c5d  default    dc1  pc1   <none>  false  eligible     ready\n\
                 2a2b2c2d  default    dc1  pc2   <none>  false  eligible     initializing\n";
    assert_eq!(config::node_status(nodes, "pc1").as_deref(), Some("ready"));
    assert_eq!(
        config::node_status(nodes, "pc2").as_deref(),
        Some("initializing")
    );
    assert_eq!(config::node_status(nodes, "pc9"), None);
    assert_eq!(
        config::Version::parse("Nomad v1.9.7\nBuildDate 2025"),
        Some(config::Version(1, 9, 7))
    );
    assert!(config::Version(1, 3, 1) < config::BOOTSTRAP_SECRET);
    assert_eq!(
        config::consul_version(AGENT_SELF),
        Some(config::Version(1, 8, 7))
    );
    assert_eq!(config::consul_version("{}"), None);
    let v = config::consul_version(r#"{"Config":{"Version":"1.16.2"}}"#).unwrap();
    assert!(config::consul_rules(true, Some((v.0, v.1))).contains("mesh = \"write\""));
    assert!(!config::consul_rules(false, Some((v.0, v.1))).contains("mesh"));
}
