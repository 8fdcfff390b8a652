//! The Ceph stack against a fake system: keys in Ceph's format (pinned vectors computed
//! independently with Python's hmac/hashlib and struct.pack('<HIIH', 1, 0, 0, 16)), the mkfs
//! keyring's entities and caps (ceph/ceph src/mon/AuthMonitor.cc), ceph.conf key by key
//! (doc/install/manual-deployment.rst), the cluster-file rules, what counts as an empty device,
//! and a whole apply. What Ceph does with these is shown by the three-VM rehearsal
//! (builder/tests/cluster.rs), where ceph-authtool and the monitors read the derived keys.

use std::path::Path;

use base64::Engine;

use super::config::{self, Status};
use super::disks::{self, Facts, Found};
use super::*;
use crate::agent::fake::Fake;
use crate::agent::{Agent, Outcome};
use crate::cluster::{check, render_init, Checked, InitOptions};
use crate::stack::Secrets;
use crate::stacks::testing::mode;

fn text(nodes: u32) -> String {
    render_init(&InitOptions {
        name: "lab",
        nodes,
        subnet: "10.42.0.0/24",
        stacks: &crate::stacks::named(&["ceph"]),
    })
    .unwrap()
    .replace(
        "# match = { mac = \"52:54:00:00:00:02\" }",
        "match = { mac = \"52:54:00:00:00:02\" }",
    )
    .replace("policy = \"sync\"", "policy = \"skip\"")
    .replace("/dev/disk/by-id/CHANGE-ME", "/dev/disk/by-id/virtio-osd0")
}

fn checked(t: &str) -> Checked {
    check(t).unwrap_or_else(|p| panic!("{p:#?}"))
}

fn problems(t: &str) -> Vec<String> {
    check(t)
        .err()
        .unwrap_or_default()
        .iter()
        .map(|p| p.to_string())
        .collect()
}

#[test]
fn keys_are_in_cephs_secret_format_and_pinned() {
    let secret: [u8; 32] = std::array::from_fn(|i| i as u8);
    let id = "3f9a1c2e-0000-4000-8000-000000000001";
    let s = Secrets::derive(&[&Ceph], &secret, id, &["pc1"]);
    assert_eq!(
        s.get(label::MON).unwrap(),
        "AQAAAAAAAAAAABAAJh2IXmK/Lz3MXp94HCiIvg=="
    );
    assert_eq!(
        s.get(label::ADMIN).unwrap(),
        "AQAAAAAAAAAAABAA/xhwqGER+N0YvSozUcd+8Q=="
    );
    assert_eq!(
        s.get_for(label::MGR, "pc1").unwrap(),
        "AQAAAAAAAAAAABAALoRokAFiOr4n50QJrN/FbQ=="
    );
    assert_eq!(
        s.get(label::FSID).unwrap(),
        "559d3fd2-89e9-4857-b5ac-0fcff6102a64"
    );
    // Every key: 28 bytes, type 1 (AES), created 0.0, length 16; base64 begins "AQ".
    for (spec, v) in s.specs().filter(|(x, _)| x.label != label::FSID) {
        let b = base64::engine::general_purpose::STANDARD.decode(v).unwrap();
        assert_eq!(b.len(), 28, "{}", spec.name);
        assert_eq!(
            &b[..12],
            &[1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0],
            "{}",
            spec.name
        );
        assert!(v.starts_with("AQ"), "{v}");
    }
    // Nine cluster-wide values and one manager key for the one node given.
    assert_eq!(s.specs().count(), 10);
    assert!(s.named("ceph-mgr-key/pc1").is_some());
    assert!(s.named("ceph-mgr-key/pc2").is_none());
    assert!(s.names().contains(&"ceph-mgr-key/pc1".to_owned()));
    assert!(s.names().contains(&"ceph-fsid".to_owned()));
}

#[test]
fn the_mkfs_keyring_holds_every_entity_the_monitors_would_otherwise_generate() {
    let c = checked(&text(3));
    let s = Secrets::of(crate::stacks::registry(), &c);
    let k = config::keyring(&config::mkfs_entities(&c.file, &s).unwrap());
    let sections: Vec<&str> = k
        .lines()
        .filter_map(|l| l.strip_prefix('[')?.strip_suffix(']'))
        .collect();
    assert_eq!(
        sections,
        [
            "mon.",
            "client.admin",
            "client.bootstrap-mds",
            "client.bootstrap-mgr",
            "client.bootstrap-osd",
            "client.bootstrap-rbd",
            "client.bootstrap-rbd-mirror",
            "client.bootstrap-rgw",
            "mgr.pc0",
            "mgr.pc1",
            "mgr.pc2"
        ]
    );
    assert!(k.contains(&format!(
        "[client.bootstrap-osd]\n\tkey = {}\n\tcaps mon = \"allow profile bootstrap-osd\"\n",
        s.get(label::BOOTSTRAP_OSD).unwrap()
    )));
    assert!(k.contains(&format!(
        "[mgr.pc1]\n\tkey = {}\n\tcaps mds = \"allow *\"\n\tcaps mon = \"allow profile mgr\"\n\tcaps osd = \"allow *\"\n",
        s.get_for(label::MGR, "pc1").unwrap()
    )));
    assert!(k.contains("[mon.]\n\tkey = AQ"));
    // Managers' keys differ from each other.
    assert_ne!(
        s.get_for(label::MGR, "pc0").unwrap(),
        s.get_for(label::MGR, "pc1").unwrap()
    );
}

#[test]
fn ceph_conf_key_by_key() {
    let c = checked(&text(3));
    let s = Secrets::of(crate::stacks::registry(), &c);
    let fsid = config::fsid(&c.file, &s).unwrap();
    let conf = config::ceph_conf(&c.file, &c.file.nodes[1], &fsid, Some(1 << 30));
    for line in [
        format!("fsid = {fsid}"),
        "mon_initial_members = pc0, pc1, pc2".into(),
        "mon_host = [v2:10.42.0.10:3300,v1:10.42.0.10:6789],[v2:10.42.0.11:3300,v1:10.42.0.11:6789],[v2:10.42.0.12:3300,v1:10.42.0.12:6789]".into(),
        "public_network = 10.42.0.0/24".into(),
        "auth_cluster_required = cephx".into(),
        "auth_service_required = cephx".into(),
        "auth_client_required = cephx".into(),
        "osd_pool_default_size = 3".into(),
        "osd_pool_default_min_size = 2".into(),
        "auth_allow_insecure_global_id_reclaim = false".into(),
        "osd_memory_target = 1073741824".into(),
    ] {
        assert!(conf.lines().any(|l| l == line), "{line} not in\n{conf}");
    }
    // [ceph.options] join [global], in the file's words.
    let with = checked(&text(3).replace(
        "pool_size = 3",
        "pool_size = 3\n\n[ceph.options]\nmon_warn_on_slow_ping_time = 10000\nmon_osd_down_out_interval = 1200.5\nms_crc_data = false\ndebug_mon = \"1/5\"",
    ));
    let conf2 = config::ceph_conf(&with.file, &with.file.nodes[1], &fsid, None);
    let global2 = conf2.split("[mon]").next().unwrap();
    for line in [
        "debug_mon = 1/5",
        "mon_osd_down_out_interval = 1200.5",
        "mon_warn_on_slow_ping_time = 10000",
        "ms_crc_data = false",
    ] {
        assert!(global2.lines().any(|l| l == line), "{line} not in\n{conf2}");
    }
    assert_eq!(
        conf2.lines().filter(|l| *l == "[global]").count(),
        1,
        "{conf2}"
    );
    // The same [global] on every node.
    let other = config::ceph_conf(&c.file, &c.file.nodes[2], &fsid, None);
    let global = |c: &str| {
        c.split("[mon]")
            .next()
            .unwrap()
            .lines()
            .skip(1)
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert_eq!(global(&conf), global(&other));
    // An fsid from the file wins over the derived one.
    let t = text(3).replace(
        "[ceph]\n",
        "[ceph]\nfsid = \"0C2F7B1E-9D4A-4C3B-8E5F-1A2B3C4D5E6F\"\n",
    );
    let c = checked(&t);
    assert_eq!(
        config::fsid(&c.file, &s).unwrap(),
        "0c2f7b1e-9d4a-4c3b-8e5f-1a2b3c4d5e6f"
    );
    // Memory: a third of the node's shared by its OSDs, within Ceph's range.
    let sec = config::Section::default();
    assert_eq!(
        config::osd_memory_target(&sec, 8 << 30, 1),
        (8u64 << 30) / 3
    );
    assert_eq!(
        config::osd_memory_target(&sec, 2 << 30, 1),
        config::MIN_OSD_MEMORY
    );
    assert_eq!(
        config::osd_memory_target(&sec, 64 << 30, 2),
        config::MAX_OSD_MEMORY
    );
}

#[test]
fn the_monmap_has_every_monitor_with_msgr2_and_v1() {
    let c = checked(&text(3));
    let a = config::monmap_args(&c.file, "F", "/tmp/m");
    assert_eq!(
        a.join(" "),
        "--create --clobber --fsid F --enable-all-features \
         --addv pc0 [v2:10.42.0.10:3300,v1:10.42.0.10:6789] \
         --addv pc1 [v2:10.42.0.11:3300,v1:10.42.0.11:6789] \
         --addv pc2 [v2:10.42.0.12:3300,v1:10.42.0.12:6789] /tmp/m"
    );
}

#[test]
fn managers_default_to_the_monitors() {
    let c = checked(&text(5));
    let roles: Vec<_> = c
        .file
        .nodes
        .iter()
        .map(|n| config::roles(&c.file, n))
        .collect();
    assert_eq!(roles.iter().filter(|r| r.mon).count(), 3);
    assert_eq!(roles.iter().filter(|r| r.mgr).count(), 3);
    assert!(roles.iter().all(|r| r.osd));
    // Named managers: only those.
    let t = text(3)
        .replace(
            "roles = [\"ceph-mon\", \"ceph-mgr\", \"ceph-osd\"]",
            "roles = [\"ceph-mon\", \"ceph-osd\"]",
        )
        .replacen(
            "roles = [\"ceph-mon\", \"ceph-osd\"]",
            "roles = [\"ceph-mon\", \"ceph-mgr\", \"ceph-osd\"]",
            1,
        );
    let c = checked(&t);
    assert_eq!(config::mgrs(&c.file), ["pc0"]);
    let t = text(3).replace("\"ceph-mgr\", ", "");
    assert_eq!(config::mgrs(&checked(&t).file), ["pc0", "pc1", "pc2"]);
}

#[test]
fn whole_file_rules_with_lines() {
    // The template checks, with a warning for one monitor.
    assert!(checked(&text(3)).warnings.is_empty());
    let one = checked(&text(1).replace("pool_size = 3", "pool_size = 1"));
    assert!(one
        .warnings
        .iter()
        .any(|w| w.message.contains("one ceph-mon")));
    let t = text(3);
    let cases: Vec<(String, &str)> = vec![
        (
            t.replacen("roles = [\"ceph-mon\", \"ceph-mgr\", \"ceph-osd\"]", "roles = [\"ceph-osd\"]", 1),
            "2 ceph-mon nodes: use an odd number",
        ),
        (
            t.replace("roles = [\"ceph-mon\", \"ceph-mgr\", \"ceph-osd\"]", "roles = [\"ceph-osd\"]"),
            "no node has the ceph-mon role",
        ),
        (
            t.replacen("address = \"10.42.0.10\"", "address = \"dhcp\"", 1),
            "line 46: node[0].address: a ceph-mon needs a static address",
        ),
        (
            t.replace("osd_devices = [\"/dev/disk/by-id/virtio-osd0\"]", "osd_devices = []"),
            "pc0 is a ceph-osd node but names no device",
        ),
        (
            t.replace("/dev/disk/by-id/virtio-osd0", "sdb"),
            "line 35: ceph.osd_devices[0]: \"sdb\" is not a device path",
        ),
        (
            t.replace("/dev/disk/by-id/virtio-osd0", "/dev/../sda"),
            "is not a device path",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 4"),
            "line 36: ceph.pool_size: pools keep 4 replicas on different hosts but 3 node(s) have OSDs",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\npool_min_size = 4"),
            "ceph.pool_min_size: between 1 and pool_size (3)",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\nosd_memory_target = 1000"),
            "ceph.osd_memory_target: at least 939524096 bytes",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\nfsid = \"nope\""),
            "ceph.fsid: not a UUID",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\npublic_network = \"192.168.9.0/24\""),
            "ceph.public_network: monitor pc0 (10.42.0.10) is outside it",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\nmystery = 1"),
            "ceph.mystery",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.options]\nosd_pool_default_size = 2"),
            "line 39: ceph.options.osd_pool_default_size: picoimg writes this option itself (set [ceph] pool_size): remove it here",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.options]\n\"Mon Warn\" = 1"),
            "ceph.options.Mon Warn: not a Ceph option name",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.options]\ndebug_mon = \"1/5 # loud\""),
            "ceph.options.debug_mon: a ceph.conf value cannot hold a line break, '#'",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.options]\ndebug_osd = \"  \""),
            "ceph.options.debug_osd: an empty string: leave the option out",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.options]\nmon_host = [1]"),
            "ceph.options.mon_host: picoimg writes this option itself",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.options]\nosd_op_threads = [1]"),
            "ceph.options.osd_op_threads: a string, a number or a boolean",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.node.pc9]\nosd_devices = [\"/dev/sdb\"]"),
            "ceph.node.pc9: no [[node]] is named \"pc9\"",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.node.pc1]\nwipe = [\"/dev/sdc\"]"),
            "ceph.node.pc1.wipe[0]: /dev/sdc is not one of pc1's OSD devices",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.node.pc1]\nosd_devices = [\"/dev/sdb\", \"/dev/sdb\"]"),
            "/dev/sdb is listed twice",
        ),
        (
            t.replace("pool_size = 3", "pool_size = 3\n\n[ceph.node.pc1]\nosd_devices = [\"/dev/sdb\"]\nerase = true"),
            "line 40: ceph: unknown field `erase`, expected `osd_devices` or `wipe`",
        ),
    ];
    for (file, want) in cases {
        let p = problems(&file);
        assert!(
            p.iter().any(|x| x.contains(want)),
            "want {want:?}, got {p:#?}"
        );
    }
    // A node's own list replaces the section's; wipe names one of them.
    let t = text(3).replace(
        "pool_size = 3",
        "pool_size = 3\n\n[ceph.node.pc1]\nosd_devices = [\"/dev/nvme1n1\", \"/dev/sdb\"]\nwipe = [\"/dev/sdb\"]",
    );
    let c = checked(&t);
    let pc1 = &c.file.nodes[1];
    assert_eq!(
        config::osd_devices(&c.file, pc1),
        ["/dev/nvme1n1", "/dev/sdb"]
    );
    assert_eq!(config::wipe(&c.file, pc1), ["/dev/sdb"]);
    assert_eq!(
        config::osd_devices(&c.file, &c.file.nodes[0]),
        ["/dev/disk/by-id/virtio-osd0"]
    );
    assert_eq!(Ceph.devices(&c.file, pc1), ["/dev/nvme1n1", "/dev/sdb"]);
}

/// What util-linux 2.41 (trixie) prints: `wipefs --no-act --json` on a disk with an ext4
/// filesystem, and `lsblk --json -o NAME,TYPE,MOUNTPOINTS` on a partitioned disk.
const WIPEFS_EXT4: &str = r#"{
   "signatures": [
      {
         "device": "vdb",
         "offset": "0x438",
         "type": "ext4",
         "uuid": "6c1b0a4e-8f0e-4bf4-9d39-1b4d2b3c9a10",
         "label": "photos"
      }
   ]
}"#;
const LSBLK_PARTS: &str = r#"{
   "blockdevices": [
      {"name":"sdb", "type":"disk", "mountpoints":[null],
         "children": [
            {"name":"sdb1", "type":"part", "mountpoints":["/srv/data"]}
         ]
      }
   ]
}"#;
const LSBLK_EMPTY: &str =
    r#"{"blockdevices": [{"name":"vdb", "type":"disk", "mountpoints":[null]}]}"#;

/// `ceph-volume lvm list --format json` for a device holding osd.1 (shape of reef's
/// ceph_volume/devices/lvm/listing.py: by OSD id, each LV with its tags).
fn lvm_list(cluster_fsid: &str) -> String {
    format!(
        r#"{{"1": [{{"devices": ["/dev/vdb"], "lv_name": "osd-block-0b1f", "name": "osd-block-0b1f",
        "tags": {{"ceph.cluster_fsid": "{cluster_fsid}", "ceph.osd_fsid": "0b1f8c9a-2d3e-4f50-8a6b-7c8d9e0f1a2b",
        "ceph.osd_id": "1", "ceph.type": "block"}}, "type": "block", "vg_name": "ceph-9a"}}]}}"#
    )
}

#[test]
fn only_an_empty_device_becomes_an_osd() {
    let fsid = "559d3fd2-89e9-4857-b5ac-0fcff6102a64";
    let f = |system_disk, wipefs, lsblk, lvm: &str| {
        disks::classify(
            &Facts {
                device: "/dev/vdb",
                system_disk,
                wipefs,
                lsblk,
                lvm_list: lvm,
            },
            fsid,
        )
    };
    let none = r#"{"signatures": []}"#;
    assert_eq!(f(false, "", LSBLK_EMPTY, ""), Found::Empty);
    assert_eq!(f(false, none, LSBLK_EMPTY, ""), Found::Empty);
    assert_eq!(
        f(false, WIPEFS_EXT4, LSBLK_EMPTY, ""),
        Found::Other("signatures: ext4 (label \"photos\")".into())
    );
    assert_eq!(
        f(
            false,
            r#"{"signatures":[{"type":"gpt"},{"type":"PMBR"}]}"#,
            LSBLK_PARTS,
            ""
        ),
        Found::Other("signatures: gpt, PMBR; holds sdb1 (part); mounted at /srv/data".into())
    );
    // Our OSD: activated, though LVM's signature is on it.
    let lvm = r#"{"signatures":[{"type":"LVM2_member"}]}"#;
    assert_eq!(
        f(false, lvm, LSBLK_EMPTY, &lvm_list(fsid)),
        Found::Ours {
            id: "1".into(),
            osd_fsid: "0b1f8c9a-2d3e-4f50-8a6b-7c8d9e0f1a2b".into()
        }
    );
    assert_eq!(
        f(
            false,
            lvm,
            LSBLK_EMPTY,
            &lvm_list("11111111-2222-4333-8444-555555555555")
        ),
        Found::Other(
            "an OSD of another Ceph cluster (fsid 11111111-2222-4333-8444-555555555555)".into()
        )
    );
    assert_eq!(
        f(false, lvm, LSBLK_EMPTY, ""),
        Found::Other("signatures: LVM2_member".into())
    );
    // The system disk, whatever it holds.
    assert_eq!(
        f(true, none, LSBLK_EMPTY, &lvm_list(fsid)),
        Found::SystemDisk
    );
}

#[test]
fn ceph_status_is_read_as_reef_prints_it() {
    let json = r#"{"fsid":"559d3fd2-89e9-4857-b5ac-0fcff6102a64",
      "health":{"status":"HEALTH_WARN","checks":{"TOO_FEW_OSDS":{"severity":"HEALTH_WARN"}},"mutes":[]},
      "election_epoch":6,"quorum":[0,1,2],"quorum_names":["pc0","pc1","pc2"],
      "monmap":{"epoch":1,"min_mon_release_name":"reef","num_mons":3},
      "osdmap":{"epoch":9,"num_osds":2,"num_up_osds":2,"osd_up_since":1,"num_in_osds":2,"osd_in_since":1,"num_remapped_pgs":0},
      "mgrmap":{"available":true,"num_standbys":2,"modules":["iostat"],"services":{}}}"#;
    assert_eq!(
        config::status(json).unwrap(),
        Status {
            health: "HEALTH_WARN".into(),
            checks: vec!["TOO_FEW_OSDS".into()],
            quorum: vec!["pc0".into(), "pc1".into(), "pc2".into()],
            mgr_available: true,
            osds: 2,
            up: 2,
            in_: 2,
        }
    );
    assert!(config::status("not json").is_none());
}

/// A node root with Ceph installed, pc1's MAC, and its OSD device.
fn node_root(t: &str) -> tempfile::TempDir {
    crate::stacks::testing::node_root(
        "h4-ceph",
        t,
        "52:54:00:00:00:02",
        &[
            ("dev/disk/by-id/virtio-osd0", ""),
            (
                "etc/passwd",
                "root:x:0:0:root:/root:/bin/bash\nceph:x:64045:64045::/var/lib/ceph:/usr/sbin/nologin\n",
            ),
            ("etc/group", "root:x:0:\nceph:x:64045:\n"),
            ("proc/meminfo", "MemTotal:        3903524 kB\n"),
        ],
    )
}

#[test]
fn apply_writes_conf_and_keys_and_makes_the_monitor_once() {
    let t = text(3);
    let d = node_root(&t);
    let r = d.path();
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    let calls = fake.calls();
    let c = checked(&t);
    let s = Secrets::of(crate::stacks::registry(), &c);
    let fsid = s.get(label::FSID).unwrap();
    assert!(calls.iter().any(|c| c
        == &format!("monmaptool --create --clobber --fsid {fsid} --enable-all-features --addv pc0 '[v2:10.42.0.10:3300,v1:10.42.0.10:6789]' --addv pc1 '[v2:10.42.0.11:3300,v1:10.42.0.11:6789]' --addv pc2 '[v2:10.42.0.12:3300,v1:10.42.0.12:6789]' /var/lib/ceph/tmp/picoimg-monmap")), "{calls:#?}");
    assert!(calls.iter().any(|c| c == "ceph-mon --cluster ceph --mkfs -i pc1 --monmap /var/lib/ceph/tmp/picoimg-monmap --keyring /var/lib/ceph/tmp/picoimg-mkfs.keyring --setuser ceph --setgroup ceph"), "{calls:#?}");
    assert!(calls.iter().any(|c| c
        == "systemctl enable ceph.target ceph-mon.target ceph-mon@pc1.service ceph-mgr.target ceph-mgr@pc1.service ceph-osd.target"), "{calls:#?}");
    // No key on a command line (the fsid is no key: it is in the world-readable ceph.conf);
    // the mkfs keyring is gone after mkfs.
    for (_, v) in s.specs().filter(|(x, _)| x.label != label::FSID) {
        assert!(!calls.iter().any(|c| c.contains(v)), "{v} in {calls:#?}");
    }
    assert!(!r.join("var/lib/ceph/tmp/picoimg-mkfs.keyring").exists());
    assert!(r.join("var/lib/ceph/mon/ceph-pc1/done").exists());
    let conf = std::fs::read_to_string(r.join(CONF)).unwrap();
    assert!(conf.contains(&format!("fsid = {fsid}")));
    // 3.7 GiB of memory, one OSD: the smallest useful target.
    assert!(conf.contains("osd_memory_target = 1332402858"), "{conf}");
    assert_eq!(mode(&r.join(CONF)), 0o644);
    assert_eq!(mode(&r.join(ADMIN_KEYRING)), 0o600);
    assert_eq!(mode(&r.join(BOOTSTRAP_OSD_KEYRING)), 0o600);
    assert_eq!(mode(&r.join("var/lib/ceph/mgr/ceph-pc1/keyring")), 0o600);
    let admin = std::fs::read_to_string(r.join(ADMIN_KEYRING)).unwrap();
    assert!(admin.starts_with(&format!(
        "[client.admin]\n\tkey = {}\n",
        s.get(label::ADMIN).unwrap()
    )));
    assert!(
        a.lines()
            .iter()
            .any(|l| l.contains("step ceph-devices ok: /dev/disk/by-id/virtio-osd0 empty")),
        "{:#?}",
        a.lines()
    );
    // Again: every step recorded, the monitor not made twice.
    let fake = Fake::new(r);
    let mut a = Agent::new(r, &fake, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    assert!(!fake
        .calls()
        .iter()
        .any(|c| c.starts_with("ceph-mon") || c.starts_with("monmaptool")));
}

#[test]
fn a_device_holding_a_filesystem_fails_the_node_before_anything_starts() {
    let t = text(3);
    let d = node_root(&t);
    let r = d.path();
    // The fake answers every command with nothing; a device with a filesystem answers wipefs.
    let filled = |r: &Path| {
        let mut f = Fake::new(r);
        f.answer = Box::new(|l| l.starts_with("wipefs").then(|| WIPEFS_EXT4.to_owned()));
        f
    };
    let sys = filled(r);
    let mut a = Agent::new(r, &sys, false);
    assert_eq!(a.apply(), Outcome::Failed, "{:#?}", a.lines());
    let calls = sys.calls();
    assert!(
        !calls.iter().any(|c| c.starts_with("systemctl")),
        "{calls:#?}"
    );
    let all = a.lines().join("\n");
    assert!(
        all.contains("/dev/disk/by-id/virtio-osd0 is not empty (signatures: ext4 (label \"photos\")): left untouched"),
        "{all}"
    );
    // Allowed to be wiped: the check passes (the wipe itself happens with the OSD, later).
    let t = t.replace(
        "pool_size = 3",
        "pool_size = 3\n\n[ceph.node.pc1]\nwipe = [\"/dev/disk/by-id/virtio-osd0\"]",
    );
    let d = node_root(&t);
    let r = d.path();
    let sys = filled(r);
    let mut a = Agent::new(r, &sys, false);
    assert_eq!(a.apply(), Outcome::Configured, "{:#?}", a.lines());
    assert!(a
        .lines()
        .iter()
        .any(|l| l.contains("will be wiped (listed under wipe)")));
}

#[test]
fn oldest_op_age_reads_the_admin_sockets_ops() {
    // Shape of `ceph daemon mon.pc2 ops` (reef), trimmed: the op a monitor held for minutes
    // in the rehearsal, a log message forwarded to the leader and never answered.
    let json = r#"{"ops":[{"description":"log(2 entries from seq 1 at 2026-11-30T07:18:17.733305+0000)",
      "initiated_at":"2026-11-30T07:18:18.760980+0000","age":754.462939828,"duration":754.470065705,
      "type_data":{"events":[{"event":"forwarded","time":"2026-11-30T07:18:18.9+0000","duration":0.0},
      {"event":"resend forwarded message to leader","time":"2026-11-30T07:20:02.1+0000","duration":0.0}]}},
      {"description":"mon_subscribe","age":0.5}],"num_ops":2}"#;
    assert_eq!(config::oldest_op_age(json), Some(754.462939828));
    assert_eq!(config::oldest_op_age(r#"{"ops":[],"num_ops":0}"#), None);
    assert_eq!(config::oldest_op_age("not json"), None);
}

/// A monitor holding an operation for minutes while every monitor is in quorum is restarted,
/// once, and the node then reaches HEALTH_OK; while the quorum is incomplete it is left alone.
#[test]
fn a_monitor_with_a_stuck_operation_is_restarted_once() {
    use std::cell::Cell;
    use std::rc::Rc;
    let t = text(3);
    let d = node_root(&t);
    let r = d.path();
    let fake = Fake::new(r);
    assert_eq!(Agent::new(r, &fake, false).apply(), Outcome::Configured);
    fn status(health: &str, checks: &str, quorum: &str) -> String {
        format!(
            r#"{{"health":{{"status":"{health}","checks":{{{checks}}}}},"quorum_names":[{quorum}],
            "mgrmap":{{"available":true}},"osdmap":{{"num_osds":3,"num_up_osds":3,"num_in_osds":3}}}}"#
        )
    }
    let polls = Rc::new(Cell::new(0u32));
    let restarts = Rc::new(Cell::new(0u32));
    let mut sys = Fake::new(r);
    let (p, n) = (polls.clone(), restarts.clone());
    sys.answer = Box::new(move |line| {
        let slow = r#""SLOW_OPS":{"severity":"HEALTH_WARN"}"#;
        if line.starts_with(super::STATUS) {
            p.set(p.get() + 1);
            return Some(match (p.get(), n.get()) {
                // Quorum first, with a monitor away: nothing to restart yet.
                (1 | 2, _) => status("HEALTH_WARN", slow, r#""pc0","pc1""#),
                (_, 0) => status("HEALTH_WARN", slow, r#""pc0","pc1","pc2""#),
                // After the restart: still warning for a while, then OK.
                (k, _) if k < 8 => status("HEALTH_WARN", slow, r#""pc0","pc1","pc2""#),
                _ => status("HEALTH_OK", "", r#""pc0","pc1","pc2""#),
            });
        }
        if line == "ceph daemon mon.pc1 ops" {
            return Some(
                r#"{"ops":[{"description":"log(2 entries)","age":754.4}],"num_ops":1}"#.into(),
            );
        }
        if line == "systemctl restart ceph-mon@pc1" {
            n.set(n.get() + 1);
        }
        None
    });
    let mut a = Agent::new(r, &sys, false);
    assert_eq!(a.health(), Outcome::Ready, "{:#?}", a.lines());
    assert_eq!(restarts.get(), 1);
    let calls = sys.calls();
    let first_ops = calls
        .iter()
        .position(|c| c == "ceph daemon mon.pc1 ops")
        .unwrap();
    let full_quorum_poll = calls
        .iter()
        .enumerate()
        .filter(|(_, c)| c.starts_with(super::STATUS))
        .nth(2)
        .unwrap()
        .0;
    assert!(first_ops > full_quorum_poll, "{calls:#?}");
    let all = a.lines().join("\n");
    assert!(
        all.contains("monitor pc1 restarted: an operation in it was stuck for 754 s"),
        "{all}"
    );
    assert!(
        all.contains("step health ok: ceph HEALTH_OK, 3 mons, 3 osds up"),
        "{all}"
    );
}

/// A waiting line quotes the program's own last words, without the wrapper's `  | ` margin.
#[test]
fn a_waiting_line_quotes_the_last_line_of_stderr() {
    let e = anyhow::anyhow!(
        "`/usr/lib/picoimg/ceph-status --connect-timeout 20` failed (exit status: 1); stderr:\n  | ceph-status: [errno 110] RADOS timed out (error connecting to the cluster)"
    );
    assert_eq!(
        super::short(&e),
        "ceph-status: [errno 110] RADOS timed out (error connecting to the cluster)"
    );
}
