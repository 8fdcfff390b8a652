//! `picoimg cluster init` and `picoimg cluster check`: the cluster file's command-line side.
//! The schema, checks and secret derivation live in the `picoimg-firstboot` crate, shared with
//! the program that runs on the nodes.

use std::path::Path;

use anyhow::{bail, Context, Result};
use picoimg_firstboot::cluster::{self, InitOptions};
use picoimg_firstboot::stack::Secrets;

/// Writes a fresh cluster file to `out` (0600: it holds the secret), or prints it.
pub fn init(opts: &InitOptions<'_>, out: Option<&Path>) -> Result<()> {
    let text = cluster::render_init(opts).map_err(anyhow::Error::msg)?;
    match out {
        None => crate::progress::print(format_args!("{text}"))?,
        Some(p) => {
            if p.exists() {
                bail!(
                    "{} exists: it may hold a live cluster's secret, so it is not overwritten; \
                     pick another path or remove it first",
                    p.display()
                );
            }
            picoimg_firstboot::fsutil::write_atomic(p, text.as_bytes(), 0o600)
                .with_context(|| format!("writing {}", p.display()))?;
            eprintln!(
                "picoimg: wrote {} (mode 0600: it holds the cluster secret); add your SSH key, then `picoimg cluster check {}`",
                p.display(),
                p.display()
            );
        }
    }
    Ok(())
}

/// A problem as `--json` prints it.
#[derive(serde::Serialize)]
struct JsonProblem<'a> {
    file: String,
    line: usize,
    field: &'a str,
    message: &'a str,
}

fn json_problems<'a>(file: &str, ps: &'a [cluster::Problem]) -> Vec<JsonProblem<'a>> {
    ps.iter()
        .map(|p| JsonProblem {
            file: file.to_owned(),
            line: p.line,
            field: &p.field,
            message: &p.message,
        })
        .collect()
}

/// A stack's name, the roles its components serve, and the components.
pub type StackRoles = (String, Vec<String>, Vec<String>);

/// The file's node roles that `stack` does not serve, as problems with their lines.
fn unserved_roles(text: &str, c: &cluster::Checked, stack: &StackRoles) -> Vec<cluster::Problem> {
    let (name, roles, comps) = stack;
    let mut p = Vec::new();
    for (i, n) in c.file.nodes.iter().enumerate() {
        for r in &n.roles {
            let role = r.get_ref().as_str();
            if !roles.iter().any(|x| x == role) {
                p.push(cluster::Problem {
                    line: cluster::at(text, r),
                    field: format!("node[{i}].roles"),
                    message: format!(
                        "role `{role}` is not served by stack `{name}` (components: {}); build an image whose stack has it, or drop the role",
                        comps.join(", ")
                    ),
                });
            }
        }
    }
    p
}

/// Checks a cluster file and prints every problem as `FILE:LINE: field: message` (with
/// `json`, one object with the problems and warnings as objects); with `stack`, also that
/// the stack serves every role; fails if there is any problem.
pub fn check(path: &Path, json: bool, stack: Option<&StackRoles>) -> Result<()> {
    let text = read(path)?;
    let shown = path.display().to_string();
    let result = cluster::check(&text).and_then(|c| {
        let p = stack
            .map(|s| unserved_roles(&text, &c, s))
            .unwrap_or_default();
        if p.is_empty() {
            Ok(c)
        } else {
            Err(p)
        }
    });
    if json {
        let (problems, warnings, summary) = match &result {
            Ok(c) => (
                Vec::new(),
                json_problems(&shown, &c.warnings),
                Some(serde_json::json!({
                    "name": c.file.cluster.get_ref().name.get_ref(),
                    "id": c.file.cluster.get_ref().id.get_ref(),
                    "nodes": c.file.nodes.iter().map(|n| n.name.get_ref()).collect::<Vec<_>>(),
                    "users": c.file.users.len(),
                })),
            ),
            Err(ps) => (json_problems(&shown, ps), Vec::new(), None),
        };
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "file": shown,
                "ok": result.is_ok(),
                "problems": problems,
                "warnings": warnings,
                "cluster": summary,
            }))?
        )?;
        if let Err(ps) = &result {
            bail!("{shown}: {} problem(s)", ps.len());
        }
        return Ok(());
    }
    match result {
        Ok(c) => {
            for w in &c.warnings {
                eprintln!("warning: {}", w.located(&shown));
            }
            // Nodes per role, in the order the registry lists roles.
            let roles: Vec<String> = picoimg_firstboot::stacks::registry()
                .iter()
                .flat_map(|st| st.roles().iter())
                .filter_map(|role| {
                    let n = c
                        .file
                        .nodes
                        .iter()
                        .filter(|n| n.roles.iter().any(|r| r.get_ref() == role))
                        .count();
                    (n > 0).then(|| format!("{n} {role}"))
                })
                .collect();
            let users = c.file.users.len();
            crate::outln!(
                "{shown}: cluster {} ({}): {} nodes, {}, {users} users: ok",
                c.file.cluster.get_ref().name.get_ref(),
                c.file.cluster.get_ref().id.get_ref(),
                c.file.nodes.len(),
                roles.join(", "),
            )?;
            if users == 0 {
                eprintln!(
                    "{shown}: note: no [[user]] with SSH keys: nobody will be able to log in"
                );
            }
            Ok(())
        }
        Err(problems) => {
            for p in &problems {
                crate::outln!("{}", p.located(&shown))?;
            }
            bail!("{shown}: {} problem(s)", problems.len())
        }
    }
}

/// Reads a cluster file: a regular file of at most 1 MiB of text.
fn read(path: &Path) -> Result<String> {
    picoimg_firstboot::input::read_text(
        path,
        picoimg_firstboot::input::CONFIG_LIMIT,
        "cluster file",
    )
    .context("reading the cluster file")
}

/// Reads and checks a cluster file, printing every problem as `check` does.
pub fn load(path: &Path) -> Result<(String, cluster::Checked)> {
    let text = read(path)?;
    match cluster::check(&text) {
        Ok(c) => Ok((text, c)),
        Err(problems) => {
            for p in &problems {
                eprintln!("{}", p.located(&path.display().to_string()));
            }
            bail!(
                "{}: {} problem(s); `picoimg cluster check {}` lists them",
                path.display(),
                problems.len(),
                path.display()
            )
        }
    }
}

/// The boards a cluster file's nodes name (`board = "c5"`), in file order, each once, checked
/// against `boards/`; a node without one takes `fallback` (`--board`).
pub fn boards(path: &Path, fallback: Option<&str>, data: Option<&Path>) -> Result<Vec<String>> {
    let (text, c) = load(path)?;
    let data = crate::data::find(data)?;
    if let Some(f) = fallback.filter(|f| f.contains(',')) {
        bail!(
            "--board {f}: with --cluster, --board names the one board of the nodes that name none"
        );
    }
    let mut out: Vec<String> = Vec::new();
    for n in &c.file.nodes {
        let b = match &n.board {
            Some(b) => {
                crate::data::board(&data, b.get_ref()).with_context(|| {
                    format!(
                        "{}: line {}: node {}: board",
                        path.display(),
                        cluster::at(&text, b),
                        n.name.get_ref()
                    )
                })?;
                b.get_ref().clone()
            }
            None => match fallback {
                Some(f) => f.to_owned(),
                None => bail!(
                    "{}: line {}: node {} names no board: add `board = \"h4\"` (or another of `picoimg boards`) to its [[node]], or pass --board for the nodes that name none",
                    path.display(),
                    cluster::at(&text, &n.name),
                    n.name.get_ref()
                ),
            },
        };
        if !out.contains(&b) {
            out.push(b);
        }
    }
    Ok(out)
}

/// Prints a secret derived from the cluster file: `name`, or without it the operator token
/// of the stack the file uses (Consul's management token, for CONSUL_HTTP_TOKEN).
pub fn token(path: &Path, name: Option<&str>) -> Result<()> {
    let (_, c) = load(path)?;
    let stacks: Vec<_> = picoimg_firstboot::stacks::registry()
        .iter()
        .copied()
        .filter(|s| picoimg_firstboot::stack::used(*s, &c.file))
        .collect();
    let secrets = Secrets::of(&stacks, &c);
    let names = || secrets.names().join(", ");
    let value = match name {
        Some(n) => match secrets.named(n) {
            Some((_, v)) => v.to_owned(),
            None => bail!(
                "{}: no secret named {n:?} for the stacks this file uses; the names are: {}",
                path.display(),
                names()
            ),
        },
        None => {
            let ops: Vec<_> = secrets.specs().filter(|(s, _)| s.operator).collect();
            match ops.as_slice() {
                [(_, v)] => (*v).to_owned(),
                [] => bail!(
                    "{}: the stacks this file uses have no operator token; secrets by name: {}",
                    path.display(),
                    names()
                ),
                _ => bail!(
                    "{}: several operator tokens; name one: {}",
                    path.display(),
                    ops.iter()
                        .map(|(s, _)| s.name)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
    };
    // A key in PEM ends with its own newline.
    crate::outln!("{}", value.trim_end())?;
    Ok(())
}

/// `picoimg cluster kubeconfig`: an admin kubeconfig for the file's K3s cluster, to stdout or
/// to `out` (0600), its API at `server` (a k3s-server's address or a `tls_san`; by default the
/// first k3s-server's address, the node that founds the cluster).
pub fn kubeconfig(path: &Path, server: Option<&str>, out: Option<&Path>) -> Result<()> {
    use picoimg_firstboot::stacks::k3s::{self, config as k3s_config};
    let (_, c) = load(path)?;
    let servers = k3s_config::servers(&c.file);
    let Some(first) = servers.first() else {
        bail!(
            "{}: no node has the k3s-server role: a kubeconfig is for a K3s cluster \
             (`picoimg cluster init --stack k3s` writes one)",
            path.display()
        );
    };
    let mut hosts: Vec<String> = servers
        .iter()
        .map(|n| n.address.get_ref().clone())
        .collect();
    hosts.extend(
        k3s_config::section(&c.file)
            .tls_san
            .iter()
            .map(|s| s.get_ref().clone()),
    );
    let host = match server {
        None => first.address.get_ref().clone(),
        Some(h) if hosts.iter().any(|k| k == h) => h.to_owned(),
        Some(h) => bail!(
            "--server {h}: the API's certificate names only the k3s-servers' addresses and \
             `[k3s] tls_san` of {}: use one of {}, or add {h} to tls_san before the first boot",
            path.display(),
            hosts.join(", ")
        ),
    };
    let stacks = [&k3s::K3s as &dyn picoimg_firstboot::stack::Stack];
    let secrets = Secrets::of(&stacks, &c);
    let text = k3s::pki::admin_kubeconfig(
        &secrets,
        c.file.cluster.get_ref().name.get_ref(),
        &format!("https://{host}:{}", k3s_config::API_PORT),
    )
    .context("making the admin kubeconfig")?;
    match out {
        Some(o) => picoimg_firstboot::fsutil::write_atomic(o, text.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", o.display()))?,
        None => crate::outln!("{}", text.trim_end())?,
    }
    Ok(())
}

/// `picoimg personalise`: the cluster file and node name onto an image's boot partition.
pub fn personalise(image: &Path, cluster_file: &Path, node: Option<&str>) -> Result<()> {
    if image.extension().is_some_and(|e| e == "xz") {
        bail!(
            "{} is compressed: personalise a raw .img or a written card (or use `picoimg flash --cluster`)",
            image.display()
        );
    }
    let meta = std::fs::metadata(image).with_context(|| format!("{}", image.display()))?;
    use std::os::unix::fs::FileTypeExt;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        bail!(
            "{} is {}: give a raw .img file or a card's block device",
            image.display(),
            picoimg_firstboot::input::kind_of(&meta)
        );
    }
    let (text, c) = load(cluster_file)?;
    if let Some(n) = node {
        crate::personalise::check_node(&c, cluster_file, n)?;
    }
    crate::personalise::put_cluster(image, &text, node)?;
    eprintln!(
        "picoimg: wrote picoimg/cluster.toml{} to the boot partition of {}",
        if node.is_some() {
            " and picoimg/node.toml"
        } else {
            ""
        },
        image.display()
    );
    Ok(())
}
