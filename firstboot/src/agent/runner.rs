//! Runs named steps in order, each at most once per input: a step whose recorded input is
//! unchanged is skipped, one whose input changed is re-applied only when that is safe, and
//! each success is recorded durably before its line is printed.

use std::path::Path;

use anyhow::{bail, Result};

use super::report::Reporter;
use super::state::{self, State, StepRecord};
use super::system::Target;
use crate::stack::{Progress, Step};

/// Runs `steps`; returns the names of the steps kept back (changed input, not re-applied).
pub fn run(
    steps: Vec<Step<'_>>,
    t: &Target<'_>,
    rep: &mut Reporter,
    state: &mut State,
    node: &str,
) -> Result<Vec<String>> {
    let mut names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("two steps are named {}: each step needs its own name", w[0]);
    }
    let mut kept = Vec::new();
    for step in steps {
        match state.steps.get(&step.name) {
            Some(r) if r.input == step.input => {
                rep.step(&step.name, "ok", "already done");
                continue;
            }
            Some(_) if !step.reapply => {
                rep.step(
                    &step.name,
                    "kept",
                    "its part of the cluster file changed since it was applied, and changing it on a configured node is not safe",
                );
                kept.push(step.name);
                continue;
            }
            _ => {}
        }
        match (step.apply)(t) {
            Ok(detail) => {
                state.steps.insert(
                    step.name.clone(),
                    StepRecord {
                        input: step.input,
                        at: state::now(),
                    },
                );
                state.node = node.to_owned();
                state::save(t.root, state)?;
                rep.step(&step.name, "ok", &detail);
            }
            Err(e) => {
                rep.step(&step.name, "failed", &format!("{e:#}"));
                return Err(e.context(format!("step {}", step.name)));
            }
        }
    }
    Ok(kept)
}

/// What a stack's health check reports through: lines, and one-time actions recorded in the
/// state like steps.
pub struct Health<'r> {
    pub root: &'r Path,
    pub rep: &'r mut Reporter,
    pub state: &'r mut State,
}

impl Progress for Health<'_> {
    fn say(&mut self, line: String) {
        self.rep.say(line);
    }

    fn once(
        &mut self,
        name: &str,
        input: &str,
        f: &mut dyn FnMut() -> Result<String>,
    ) -> Result<()> {
        if self.state.steps.contains_key(name) {
            return Ok(());
        }
        let detail = f()?;
        self.state.steps.insert(
            name.to_owned(),
            StepRecord {
                input: input.to_owned(),
                at: state::now(),
            },
        );
        state::save(self.root, self.state)?;
        self.rep.step(name, "ok", &detail);
        Ok(())
    }
}
