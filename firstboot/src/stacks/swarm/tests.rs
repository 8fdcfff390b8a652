use super::*;
use crate::stacks::testing::{checked, problems};

fn file(roles: &[&str], extra: &str) -> String {
    let mut t = crate::cluster::render_init(&crate::cluster::InitOptions {
        name: "lab",
        nodes: roles.len() as u32,
        subnet: "10.77.0.0/24",
        stacks: &crate::stacks::named(&["swarm"]),
    })
    .unwrap()
    .replace("[swarm]\n", &format!("[swarm]\n{extra}"))
    .replace("roles = [\"swarm-manager\"]", "ROLES")
    .replace("roles = [\"swarm-worker\"]", "ROLES");
    for r in roles {
        t = t.replacen("ROLES", &format!("roles = [{r}]"), 1);
    }
    t
}

#[test]
fn managers_are_odd_static_and_the_pool_is_apart() {
    let m = "\"swarm-manager\"";
    let w = "\"swarm-worker\"";
    checked(&file(&[m, m, m, w], ""));
    let t = file(&[m, m, w], "");
    let p = problems(&t);
    let even = p
        .iter()
        .find(|p| {
            p.message
                .contains("2 swarm-manager nodes: use an odd number")
        })
        .unwrap_or_else(|| panic!("{p:#?}"));
    // It points at the second manager's roles.
    let second = t
        .lines()
        .enumerate()
        .filter(|(_, l)| l.starts_with("roles = [\"swarm-manager"))
        .nth(1)
        .unwrap()
        .0;
    assert_eq!(even.line, second + 1, "{t}");
    let p = problems(&file(&[w, w], ""));
    assert!(
        p.iter()
            .any(|p| p.message.contains("no node has the swarm-manager role")),
        "{p:#?}"
    );
    let p = problems(&file(&["\"swarm-manager\", \"swarm-worker\""], ""));
    assert!(p.iter().any(|p| p.field == "node[0].roles"), "{p:#?}");
    let p = problems(&file(&[m], "default_addr_pool = \"10.0.0.0/8\"\n"));
    let over = p
        .iter()
        .find(|p| p.field == "swarm.default_addr_pool")
        .unwrap_or_else(|| panic!("{p:#?}"));
    assert!(
        over.message
            .contains("overlaps the nodes' subnet 10.77.0.0/24"),
        "{over:?}"
    );
    let t = file(&[m], "default_addr_pool = \"10.0.0.0/8\"\n");
    assert_eq!(over.line, t_line(&t, "default_addr_pool") + 1);
    let p = problems(&file(&[m], "mask_length = 12\n"));
    assert!(p.iter().any(|p| p.field == "swarm.mask_length"), "{p:#?}");
    let p = problems(&file(&[m], "not_a_key = \"10.9.0.0/16\"\n"));
    assert!(!p.is_empty());
}

#[test]
fn docker_says_what_the_swarm_is() {
    let l = parse_local(r#"{"NodeID":"abc","LocalNodeState":"active","ControlAvailable":true,"Cluster":{"ID":"xyz"}}"#).unwrap();
    assert_eq!(
        (l.state.as_str(), l.control, l.cluster.as_str()),
        ("active", true, "xyz")
    );
    let l = parse_local(r#"{"NodeID":"","LocalNodeState":"inactive","ControlAvailable":false}"#)
        .unwrap();
    assert_eq!(l.state, "inactive");
    let list = parse_nodes(concat!(
        r#"{"Availability":"Active","Hostname":"pc0","ID":"a1","ManagerStatus":"Leader","Status":"Ready"}"#,
        "\n",
        r#"{"Availability":"Active","Hostname":"pc1","ID":"b1","ManagerStatus":"Reachable","Status":"Ready"}"#,
        "\n",
        r#"{"Availability":"Active","Hostname":"pc2","ID":"c1","ManagerStatus":"","Status":"Ready"}"#,
        "\n",
        r#"{"Availability":"Active","Hostname":"pc0","ID":"a0","ManagerStatus":"Unreachable","Status":"Down"}"#,
        "\n",
    ));
    let expected = [
        ("pc0", Role::Manager),
        ("pc1", Role::Manager),
        ("pc2", Role::Worker),
    ];
    assert_eq!(swarm_state(&list, &expected), Ok("pc0".into()));
    let wrong = [
        ("pc0", Role::Manager),
        ("pc1", Role::Manager),
        ("pc2", Role::Manager),
    ];
    assert_eq!(
        swarm_state(&list, &wrong),
        Err("2 of 3 nodes Ready in their role (not yet: pc2 (manager))".into())
    );
}

fn t_line(t: &str, needle: &str) -> usize {
    t.lines().position(|l| l.starts_with(needle)).unwrap()
}
