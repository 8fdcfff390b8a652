//! The core names no stack: every registered stack's name, section, roles, accounts and secret
//! names/labels are absent from the core's source (test modules aside), so adding a stack
//! cannot mean editing the core.

use super::registry;

/// The core: cluster-file frame, identification, state, reporting, runner, base steps, and
/// what builder and agent share.
const CORE: &[(&str, &str)] = &[
    ("agent/mod.rs", include_str!("../agent/mod.rs")),
    ("agent/base.rs", include_str!("../agent/base.rs")),
    ("agent/report.rs", include_str!("../agent/report.rs")),
    ("agent/runner.rs", include_str!("../agent/runner.rs")),
    ("agent/state.rs", include_str!("../agent/state.rs")),
    ("agent/system.rs", include_str!("../agent/system.rs")),
    ("cluster.rs", include_str!("../cluster.rs")),
    ("identify.rs", include_str!("../identify.rs")),
    ("contract.rs", include_str!("../contract.rs")),
    ("secrets.rs", include_str!("../secrets.rs")),
    ("stack.rs", include_str!("../stack.rs")),
    ("fsutil.rs", include_str!("../fsutil.rs")),
    ("input.rs", include_str!("../input.rs")),
    ("cmd.rs", include_str!("../cmd.rs")),
    ("main.rs", include_str!("../main.rs")),
    ("lib.rs", include_str!("../lib.rs")),
];

#[test]
fn the_core_names_no_stack() {
    let mut words: Vec<String> = Vec::new();
    for s in registry() {
        words.push(s.name().into());
        words.extend(s.section().map(str::to_owned));
        words.extend(s.roles().iter().map(|r| r.to_string()));
        words.extend(s.accounts().iter().map(|a| a.to_string()));
        words.extend(
            s.secrets()
                .iter()
                .flat_map(|x| [x.name.to_owned(), x.label.to_owned()]),
        );
    }
    let mut found = Vec::new();
    for (file, text) in CORE {
        let code = text.split("\n#[cfg(test)]").next().unwrap_or_default();
        let lower = code.to_lowercase();
        for w in &words {
            if let Some(at) = lower.find(&w.to_lowercase()) {
                let line = code[..at].matches('\n').count() + 1;
                found.push(format!("{file}:{line}: {w}"));
            }
        }
    }
    assert!(
        found.is_empty(),
        "the core names a stack:\n{}",
        found.join("\n")
    );
}

#[test]
fn every_role_section_and_secret_has_one_owner() {
    let mut roles = Vec::new();
    let mut sections = Vec::new();
    let mut labels = Vec::new();
    let mut names = Vec::new();
    for s in registry() {
        roles.extend(s.roles().iter().copied());
        sections.extend(s.section());
        labels.extend(s.secrets().iter().map(|x| x.label));
        names.push(s.name());
        for x in s.secrets() {
            assert!(x.label.starts_with("picoimg/v1/"), "{}", x.label);
            if matches!(x.form, crate::stack::Form::Uuid) {
                assert_eq!(x.bytes, 16, "{}", x.label);
            }
        }
    }
    for list in [&roles, &sections, &labels, &names] {
        let mut sorted = list.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), list.len(), "{list:?}");
    }
}
