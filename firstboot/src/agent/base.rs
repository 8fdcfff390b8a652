//! The base steps every node runs: hostname, hosts, network, users and time before the
//! stacks' steps, and services (enable and start what the stacks name) after them.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use super::system::Target;
use crate::cluster::{self, ClusterFile, Node, TimePolicy};
use crate::cmd::Cmd;
use crate::fsutil::write_atomic;
use crate::stack::{fingerprint, Step};

pub const NETWORK_FILE: &str = "etc/systemd/network/10-picoimg-cluster.network";
pub const TIMESYNC_DROPIN: &str = "etc/systemd/timesyncd.conf.d/50-picoimg.conf";
pub const SUDOERS: &str = "etc/sudoers.d/picoimg";
/// systemd-timesyncd creates this once the clock is synchronised.
pub const TIME_SYNCED: &str = "run/systemd/timesync/synchronized";

/// The steps before the stacks'. `mac`: the port this node was recognised by (or its first).
pub fn before<'a>(
    file: &'a ClusterFile,
    node: &'a Node,
    mac: Option<String>,
) -> Result<Vec<Step<'a>>> {
    let network = network_file(file, node, mac.as_deref());
    let hosts = hosts_file(file, node);
    let time_conf = timesync_dropin(file);
    let users_input = serde_json::to_string(
        &file
            .users
            .iter()
            .map(|u| {
                (
                    u.name.get_ref(),
                    u.sudo,
                    u.ssh_keys.iter().map(|k| k.get_ref()).collect::<Vec<_>>(),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    let time = &file.time;
    Ok(vec![
        Step {
            name: "hostname".into(),
            input: fingerprint(&[node.name.get_ref()]),
            reapply: false,
            apply: Box::new(move |t: &Target<'_>| hostname(t, node)),
        },
        Step {
            name: "hosts".into(),
            input: fingerprint(&[&hosts]),
            reapply: true,
            apply: Box::new(move |t: &Target<'_>| {
                t.write("etc/hosts", &hosts, 0o644).map(|_| String::new())
            }),
        },
        Step {
            name: "network".into(),
            input: fingerprint(&[network.as_deref().unwrap_or("dhcp")]),
            reapply: false,
            apply: Box::new(move |t: &Target<'_>| self::network(t, node, network.as_deref())),
        },
        Step {
            name: "users".into(),
            input: fingerprint(&[&users_input]),
            reapply: true,
            apply: Box::new(move |t: &Target<'_>| users(t, file)),
        },
        Step {
            name: "time".into(),
            input: fingerprint(&[
                &format!("{:?} {}", time.policy, time.timeout),
                time_conf.as_deref().unwrap_or(""),
            ]),
            reapply: true,
            apply: Box::new(move |t: &Target<'_>| self::time(t, file, time_conf.as_deref())),
        },
    ])
}

/// The last step: enable and start the stacks' units for this node.
pub fn services<'a>(mut units: Vec<String>) -> Step<'a> {
    // Two stacks may need one unit (picoimg-handover.service): once, in first-named order.
    let mut seen = std::collections::BTreeSet::new();
    units.retain(|u| seen.insert(u.clone()));
    Step {
        name: "services".into(),
        input: fingerprint(&[&units.join(" ")]),
        reapply: true,
        apply: Box::new(move |t: &Target<'_>| start(t, &units)),
    }
}

fn hostname(t: &Target<'_>, node: &Node) -> Result<String> {
    let name = node.name.get_ref();
    t.write("etc/hostname", &format!("{name}\n"), 0o644)?;
    t.sys.run(&Cmd::new("hostname").arg(name))?;
    Ok(name.clone())
}

fn network(t: &Target<'_>, node: &Node, file: Option<&str>) -> Result<String> {
    let path = t.p(NETWORK_FILE);
    let detail = match file {
        Some(text) => {
            t.write(NETWORK_FILE, text, 0o644)?;
            format!("static {}", node.address.get_ref())
        }
        None => {
            if path.exists() {
                std::fs::remove_file(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
            "dhcp".to_owned()
        }
    };
    t.sys.run(&Cmd::new("networkctl").arg("reload"))?;
    if file.is_some() {
        // Services bind to the address: wait until networkd has put it on the link.
        let want = format!("inet {}/", node.address.get_ref());
        let mut seen = String::new();
        for _ in 0..60 {
            seen = t
                .sys
                .run(&Cmd::new("ip").args(["-o", "-4", "addr", "show"]))?;
            if seen.contains(&want) {
                return Ok(detail);
            }
            t.sys.sleep(Duration::from_secs(1));
        }
        bail!(
            "{} is not on any interface after 60 s (is the cable in?); addresses now: {}",
            node.address.get_ref(),
            seen.lines()
                .filter_map(|l| l.split_whitespace().nth(3))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(detail)
}

fn users(t: &Target<'_>, file: &ClusterFile) -> Result<String> {
    let mut sudoers = String::from(
        "# Written by picoimg-firstboot: users of the cluster file (SSH keys only, no passwords).\n",
    );
    let mut names = Vec::new();
    for u in &file.users {
        let name = u.name.get_ref();
        match t.ids(name) {
            // The cluster file's check refuses the usual system names; this image may have
            // more (accounts its packages made).
            Some((uid, _)) if uid < 1000 => bail!(
                "user {name} is a system account of this image (uid {uid}): pick another name under [[user]]"
            ),
            Some(_) => {}
            None => {
                // `*`: no password can match, yet the account is not locked, so SSH keys work.
                t.sys.run(
                    &Cmd::new("useradd")
                        .args(["--create-home", "--shell", "/bin/bash", "--password", "*"])
                        .args(["--comment", "picoimg cluster user"])
                        .arg(name),
                )?;
            }
        }
        let (uid, gid) = t
            .ids(name)
            .ok_or_else(|| anyhow!("user {name} is missing from /etc/passwd after useradd"))?;
        let home = format!("home/{name}");
        let ssh = t.p(&format!("{home}/.ssh"));
        std::fs::create_dir_all(&ssh).with_context(|| format!("creating {}", ssh.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o700))?;
        let keys: String = u
            .ssh_keys
            .iter()
            .map(|k| format!("{}\n", k.get_ref().trim()))
            .collect();
        let ak = ssh.join("authorized_keys");
        write_atomic(&ak, keys.as_bytes(), 0o600)?;
        for p in [t.p(&home), ssh, ak] {
            t.sys.chown(&p, uid, gid)?;
        }
        if u.sudo {
            sudoers.push_str(&format!("{name} ALL=(ALL) NOPASSWD:ALL\n"));
        }
        names.push(format!("{name} ({} keys)", u.ssh_keys.len()));
    }
    t.write(SUDOERS, &sudoers, 0o440)?;
    Ok(if names.is_empty() {
        "no users in the cluster file".into()
    } else {
        names.join(", ")
    })
}

fn time(t: &Target<'_>, file: &ClusterFile, dropin: Option<&str>) -> Result<String> {
    if let Some(text) = dropin {
        t.write(TIMESYNC_DROPIN, text, 0o644)?;
        t.sys
            .run(&Cmd::new("systemctl").args(["try-restart", "systemd-timesyncd.service"]))?;
    }
    let tm = &file.time;
    if tm.policy == TimePolicy::Skip {
        return Ok("not waiting for a synchronised clock (policy skip)".into());
    }
    for waited in 0..=tm.timeout {
        if t.p(TIME_SYNCED).exists() {
            return Ok(format!("clock synchronised (waited {waited} s)"));
        }
        if waited < tm.timeout {
            t.sys.sleep(Duration::from_secs(1));
        }
    }
    if tm.policy == TimePolicy::Require {
        bail!(
            "clock not synchronised after {} s and the policy is \"require\": check [network] ntp and the gateway",
            tm.timeout
        );
    }
    Ok(format!(
        "clock not synchronised after {} s; going on (policy sync): logs and certificates may carry wrong times",
        tm.timeout
    ))
}

fn start(t: &Target<'_>, units: &[String]) -> Result<String> {
    if units.is_empty() {
        return Ok("no cluster services on this node".into());
    }
    t.sys
        .run(&Cmd::new("systemctl").arg("enable").args(units))?;
    // --no-block: the units are ordered after this one (their drop-ins), so they start once
    // it exits.
    t.sys.run(
        &Cmd::new("systemctl")
            .args(["start", "--no-block"])
            .args(units),
    )?;
    Ok(format!("enabled and started {}", units.join(" ")))
}

fn hosts_file(file: &ClusterFile, node: &Node) -> String {
    let peers: Vec<(&str, &str)> = file
        .nodes
        .iter()
        .filter(|n| n.address.get_ref() != "dhcp")
        .map(|n| (n.address.get_ref().as_str(), n.name.get_ref().as_str()))
        .collect();
    crate::contract::hosts(
        "picoimg-firstboot from the cluster file",
        node.name.get_ref(),
        &peers,
    )
}

/// The networkd file for a static address (`None` for DHCP: the image's default applies).
fn network_file(file: &ClusterFile, node: &Node, mac: Option<&str>) -> Option<String> {
    let addr = node.address.get_ref();
    if addr == "dhcp" {
        return None;
    }
    let prefix = cluster::Subnet::parse(file.network.subnet.get_ref()).map_or(24, |s| s.prefix);
    let mut s =
        String::from("# Written by picoimg-firstboot: this node's cluster address.\n[Match]\n");
    match mac {
        Some(m) => s.push_str(&format!("MACAddress={m}\n")),
        None => s.push_str("Type=ether\n"),
    }
    s.push_str(&format!(
        "\n[Network]\nAddress={addr}/{prefix}\nGateway={}\n",
        file.network.gateway.get_ref()
    ));
    for d in &file.network.dns {
        s.push_str(&format!("DNS={}\n", d.get_ref()));
    }
    for n in &file.network.ntp {
        s.push_str(&format!("NTP={}\n", n.get_ref()));
    }
    Some(s)
}

fn timesync_dropin(file: &ClusterFile) -> Option<String> {
    (!file.network.ntp.is_empty()).then(|| {
        format!(
            "# Written by picoimg-firstboot from the cluster file.\n[Time]\nNTP={}\n",
            file.network
                .ntp
                .iter()
                .map(|n| n.get_ref().as_str())
                .collect::<Vec<_>>()
                .join(" ")
        )
    })
}
