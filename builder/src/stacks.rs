//! `picoimg stacks`: the stacks and presets with their components, what the integration
//! guide's configurations have that picoimg cannot install yet, and the platform matrix
//! (which board runs which stack, and why not).

use std::path::Path;

use anyhow::Result;

use crate::component::{self, Refused, Stack};

/// A matrix cell: `Ok`, the matrix's refusal, or another error as text.
pub type Cell = std::result::Result<(), std::result::Result<Refused, String>>;

/// One row of the matrix: a stack, and per board (in `boards/` order) its cell.
pub struct Row {
    pub stack: String,
    pub cells: Vec<Cell>,
}

/// The platform matrix: every stack against every board.
pub fn matrix(data: &Path) -> Result<(Vec<String>, Vec<Row>)> {
    let boards: Vec<crate::board::Board> = crate::data::board_names(data)
        .iter()
        .map(|n| crate::data::board(data, n))
        .collect::<Result<_>>()?;
    let stacks = component::stacks(data)?;
    let rows = stacks
        .keys()
        .map(|stack| Row {
            cells: boards
                .iter()
                .map(|b| component::cell(data, &stacks, stack, b))
                .collect(),
            stack: stack.clone(),
        })
        .collect();
    Ok((boards.into_iter().map(|b| b.name).collect(), rows))
}

/// What a matrix cell says: `yes`, `no` (a component the board cannot run, or an error), or
/// `not yet` (a part picoimg cannot install yet); and why not, the same for every board it
/// holds for.
fn mark(cell: &Cell) -> (&'static str, Option<String>) {
    match cell {
        Ok(()) => ("yes", None),
        Err(Ok(r @ Refused::NotYet { .. })) => ("not yet", Some(r.to_string())),
        Err(Ok(Refused::NotOnBoard { why, .. })) => ("no", Some(why.clone())),
        Err(Err(e)) => ("no", Some(e.clone())),
    }
}

/// Prints the stacks (`--json` for scripts), or with `matrix` the board x stack table.
pub fn print(data: &Path, json: bool, matrix: bool) -> Result<()> {
    if matrix {
        return print_matrix(data, json);
    }
    let stacks = component::stacks(data)?;
    let unavailable = |name: &str| -> Result<String> {
        Ok(component::load(data, name)?
            .file
            .unavailable
            .unwrap_or_default())
    };
    if json {
        let mut v = Vec::new();
        for (name, st) in &stacks {
            let mut o = serde_json::to_value(st)?;
            o["name"] = name.clone().into();
            o["not_yet"] = st
                .not_yet
                .iter()
                .map(|c| Ok(serde_json::json!({"component": c, "why": unavailable(c)?})))
                .collect::<Result<Vec<_>>>()?
                .into();
            v.push(o);
        }
        crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    for (name, st) in &stacks {
        let Stack {
            description,
            components,
            guide,
            optional,
            not_yet,
        } = st;
        crate::outln!("{name:12} {description} [{}]", components.join(", "))?;
        if let Some(g) = guide {
            crate::outln!("{:12}   the guide's {g}", "")?;
        }
        for o in optional {
            crate::outln!("{:12}   may add {o}: --stack {name},{o}", "")?;
        }
        for c in components.iter().chain(not_yet) {
            let why = unavailable(c)?;
            if !why.is_empty() {
                crate::outln!("{:12}   not yet: {c}: {why}", "")?;
            }
        }
    }
    Ok(())
}

fn print_matrix(data: &Path, json: bool) -> Result<()> {
    let (boards, rows) = matrix(data)?;
    if json {
        let v = serde_json::json!({
            "boards": boards,
            "stacks": rows.iter().map(|r| serde_json::json!({
                "name": r.stack,
                "boards": boards.iter().zip(&r.cells).map(|(b, c)| (b.clone(), match mark(c) {
                    (_, None) => serde_json::json!({"builds": true}),
                    (m, Some(why)) => serde_json::json!({"builds": false, "mark": m, "why": why}),
                })).collect::<serde_json::Map<_, _>>(),
            })).collect::<Vec<_>>(),
        });
        crate::outln!("{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    let first = rows.iter().map(|r| r.stack.len()).max().unwrap_or(5).max(5);
    let widths: Vec<usize> = boards.iter().map(|b| b.len().max(7)).collect();
    let mut line = format!("{:first$}", "stack");
    for (b, w) in boards.iter().zip(&widths) {
        line.push_str(&format!("  {b:w$}"));
    }
    crate::outln!("{}", line.trim_end())?;
    for r in &rows {
        let mut line = format!("{:first$}", r.stack);
        for (c, w) in r.cells.iter().zip(&widths) {
            line.push_str(&format!("  {:w$}", mark(c).0));
        }
        crate::outln!("{}", line.trim_end())?;
    }
    // Why not: once per stack and reason, with the boards it holds for.
    for r in &rows {
        let mut reasons: Vec<(String, Vec<&str>)> = Vec::new();
        for (b, c) in boards.iter().zip(&r.cells) {
            if let (_, Some(why)) = mark(c) {
                match reasons.iter_mut().find(|(w, _)| *w == why) {
                    Some((_, bs)) => bs.push(b),
                    None => reasons.push((why, vec![b])),
                }
            }
        }
        for (why, bs) in reasons {
            crate::outln!("{} on {}: {why}", r.stack, bs.join(", "))?;
        }
    }
    Ok(())
}
