//! Dependencies run one way: no import cycle between the crate's top-level modules
//! (`data`, `tokenize`, `kernels`, `model`, `cache`, `infer`, `eval`, `train`, `serve`,
//! ...), none between the files of `model`, `kernels` and `serve`, and `kernels` imports
//! nothing else of the crate. Read from the source (comments, string literals and
//! `#[cfg(test)]` items ignored), so it runs in the default suite with no tools installed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[path = "common/source.rs"]
mod source;
use source::{cfg_test_ranges, code_only, rust_files};

type Graph = BTreeMap<String, BTreeSet<String>>;

/// `text` as code only: comments and literals blanked, `#[cfg(test)]` items removed.
fn non_test_code(text: &str) -> String {
    let code: Vec<char> = code_only(text).chars().collect();
    let skip = cfg_test_ranges(&code);
    code.iter()
        .enumerate()
        .map(|(i, &c)| {
            if skip.iter().any(|&(a, b)| (a..=b).contains(&i)) {
                ' '
            } else {
                c
            }
        })
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The paths that follow every `prefix` (e.g. `crate::`) in `code`, with brace groups
/// expanded: `crate::{a::b, c}` gives `a::b` and `c`; `crate::a::{b, c}` gives `a::b`, `a::c`.
fn paths_after(code: &str, prefix: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let p: Vec<char> = prefix.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i + p.len() <= chars.len() {
        let starts = chars[i..i + p.len()] == p[..] && (i == 0 || !is_ident(chars[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        let (paths, end) = parse_tree(&chars, i + p.len());
        out.extend(paths);
        i = end.max(i + 1);
    }
    out
}

/// Char ranges of inline modules (`mod name { ... }`) in `code`.
fn inline_mod_ranges(code: &[char]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 4 < code.len() {
        let at_word = code[i..i + 3] == ['m', 'o', 'd']
            && (i == 0 || !is_ident(code[i - 1]))
            && code[i + 3].is_whitespace();
        if at_word {
            let mut j = i + 3;
            while j < code.len() && code[j].is_whitespace() {
                j += 1;
            }
            while j < code.len() && is_ident(code[j]) {
                j += 1;
            }
            while j < code.len() && code[j].is_whitespace() {
                j += 1;
            }
            if code.get(j) == Some(&'{') {
                let mut depth = 0usize;
                let mut k = j;
                while k < code.len() {
                    match code[k] {
                        '{' => depth += 1,
                        '}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    k += 1;
                }
                out.push((j, k));
            }
        }
        i += 1;
    }
    out
}

/// The paths that `super::` reaches from file level: inside `n` nested inline modules the
/// first `n` `super::` hops stay in the file (and are not dependencies); one more reaches
/// the parent module. Deeper chains are not followed.
fn super_paths(code: &str) -> Vec<String> {
    let chars: Vec<char> = code.chars().collect();
    let inline = inline_mod_ranges(&chars);
    let hop: Vec<char> = "super::".chars().collect();
    let is_hop = |at: usize| at + hop.len() <= chars.len() && chars[at..at + hop.len()] == hop[..];
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts = is_hop(i) && (i == 0 || !(is_ident(chars[i - 1]) || chars[i - 1] == ':'));
        if !starts {
            i += 1;
            continue;
        }
        let mut n = 0;
        let mut at = i;
        while is_hop(at) {
            n += 1;
            at += hop.len();
        }
        let depth = inline.iter().filter(|&&(a, b)| a < i && i < b).count();
        let (paths, end) = parse_tree(&chars, at);
        if n == depth + 1 {
            out.extend(paths);
        }
        i = end.max(at);
    }
    out
}

/// Parses a use-tree at `at` (`a::b`, `a::{b, c::d}`, `{a, b}`), returning its expanded paths
/// and the position after it.
fn parse_tree(c: &[char], mut at: usize) -> (Vec<String>, usize) {
    let skip_ws = |mut k: usize| {
        while k < c.len() && c[k].is_whitespace() {
            k += 1;
        }
        k
    };
    at = skip_ws(at);
    if c.get(at) == Some(&'{') {
        let mut out = Vec::new();
        at += 1;
        loop {
            at = skip_ws(at);
            match c.get(at) {
                None => return (out, at),
                Some('}') => return (out, at + 1),
                Some(',') => at += 1,
                _ => {
                    let (paths, end) = parse_tree(c, at);
                    out.extend(paths);
                    at = if end > at { end } else { at + 1 };
                }
            }
        }
    }
    let start = at;
    while at < c.len() && is_ident(c[at]) {
        at += 1;
    }
    let name: String = c[start..at].iter().collect();
    if name.is_empty() {
        return (Vec::new(), at);
    }
    let after = skip_ws(at);
    if c.get(after) == Some(&':') && c.get(after + 1) == Some(&':') {
        let (rest, end) = parse_tree(c, after + 2);
        if rest.is_empty() {
            return (vec![name], end);
        }
        return (
            rest.into_iter().map(|r| format!("{name}::{r}")).collect(),
            end,
        );
    }
    (vec![name], at)
}

/// The top-level module a file under `src/` belongs to (`src/model/bert.rs` -> `model`).
fn top_module(rel: &Path) -> Option<String> {
    let mut parts = rel.iter().map(|p| p.to_string_lossy().into_owned());
    let first = parts.next()?;
    let name = first.strip_suffix(".rs").unwrap_or(&first).to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// Edges between top-level modules: `crate::X` used in a file of module `Y != X`.
fn top_level_graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for path in files {
        let rel = path.strip_prefix(src).unwrap();
        let Some(from) = top_module(rel) else {
            continue;
        };
        let code = non_test_code(&std::fs::read_to_string(&path).unwrap());
        let entry = graph.entry(from.clone()).or_default();
        for p in paths_after(&code, "crate::") {
            let to = p.split("::").next().unwrap().to_string();
            if to != from && to != "self" {
                entry.insert(to);
            }
        }
    }
    graph
}

/// Edges between the files of one module directory (`src/model`): a file's node is its
/// path below the directory without `.rs` (`bert`, `packed/esm`, `mod`). A reference to
/// `crate::model::a::..`, `super::a` (from a direct child) or `self::a`/`a::` (from
/// `mod.rs`, re-exports and `mod` declarations excepted) is an edge to `a` when `a` is a
/// file of the directory (or `a/mod.rs`), else to `mod` (an item of `mod.rs`).
fn file_graph(dir: &Path, module: &str) -> Graph {
    let mut files = Vec::new();
    rust_files(dir, &mut files);
    let node = |path: &Path| {
        let rel = path.strip_prefix(dir).unwrap().with_extension("");
        let s = rel.to_string_lossy().replace('\\', "/");
        s.strip_suffix("/mod").map(str::to_string).unwrap_or(s)
    };
    let nodes: BTreeSet<String> = files.iter().map(|f| node(f)).collect();
    // The node a path below the module resolves to: the longest file prefix.
    let resolve = |path: &str| -> String {
        let parts: Vec<&str> = path.split("::").collect();
        for k in (1..=parts.len()).rev() {
            let cand = parts[..k].join("/");
            if nodes.contains(&cand) {
                return cand;
            }
        }
        "mod".to_string()
    };
    let mut graph = Graph::new();
    for path in &files {
        let from = node(path);
        let text = std::fs::read_to_string(path).unwrap();
        let mut code = non_test_code(&text);
        let is_mod = path.file_name().is_some_and(|n| n == "mod.rs");
        if is_mod {
            // A facade's re-exports and module declarations are not dependencies of its code.
            code = code
                .lines()
                .filter(|l| {
                    let t = l.trim_start();
                    !(t.starts_with("pub use")
                        || t.starts_with("pub(crate) use")
                        || t.starts_with("mod ")
                        || t.starts_with("pub mod ")
                        || t.starts_with("pub(crate) mod "))
                })
                .collect::<Vec<_>>()
                .join("\n");
        }
        // `super::` of `a/b.rs` and of `a/b/mod.rs` (node `a/b`) is `a`.
        let prefix_of = |from: &str| -> String {
            let mut parts: Vec<&str> = from.split('/').collect();
            parts.pop();
            parts.join("::")
        };
        let mut targets = Vec::new();
        for p in paths_after(&code, &format!("crate::{module}::")) {
            targets.push(resolve(&p));
        }
        if from != "mod" {
            let base = prefix_of(&from);
            for p in super_paths(&code) {
                let full = if base.is_empty() {
                    p
                } else {
                    format!("{base}::{p}")
                };
                targets.push(resolve(&full));
            }
        }
        if is_mod {
            let base = if from == "mod" {
                String::new()
            } else {
                from.replace('/', "::")
            };
            for p in paths_after(&code, "self::") {
                let full = if base.is_empty() {
                    p
                } else {
                    format!("{base}::{p}")
                };
                targets.push(resolve(&full));
            }
            // Plain `child::item` paths in the facade's own code.
            for child in nodes.iter().filter(|n| n.as_str() != "mod") {
                let local = match base.as_str() {
                    "" => child.clone(),
                    b => match child.strip_prefix(&format!("{}/", b.replace("::", "/"))) {
                        Some(c) => c.to_string(),
                        None => continue,
                    },
                };
                if local.contains('/') {
                    continue;
                }
                if !paths_after(&code, &format!("{local}::")).is_empty() {
                    targets.push(child.clone());
                }
            }
        }
        let entry = graph.entry(from.clone()).or_default();
        for t in targets {
            if t != from {
                entry.insert(t);
            }
        }
    }
    graph
}

/// One cycle of `graph`, if it has any (depth-first search).
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        n: &str,
        graph: &Graph,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        stack.push(n.to_string());
        for m in graph.get(n).into_iter().flatten() {
            match state.get(m.as_str()).copied().unwrap_or(0) {
                1 => {
                    let at = stack.iter().position(|s| s == m).unwrap();
                    let mut cycle = stack[at..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, graph, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in graph.keys() {
        if state.get(n.as_str()).copied().unwrap_or(0) == 0 {
            if let Some(c) = visit(n, graph, &mut state, &mut Vec::new()) {
                return Some(c);
            }
        }
    }
    None
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn assert_acyclic(graph: &Graph, what: &str) {
    if let Some(cycle) = find_cycle(graph) {
        let edges: Vec<String> = graph
            .iter()
            .map(|(k, v)| {
                format!(
                    "  {k} -> {}",
                    v.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            })
            .collect();
        panic!(
            "import cycle in {what}: {}\nall edges:\n{}",
            cycle.join(" -> "),
            edges.join("\n")
        );
    }
}

#[test]
fn the_scanner_reads_use_trees_and_finds_cycles() {
    let code = non_test_code(
        "use crate::{data::Record, model::{bert, esm::Esm}};\n\
         fn f() { crate::eval::metrics::q10(); } // crate::serve\n\
         let s = \"crate::infer\";\n\
         #[cfg(test)]\nmod tests { use crate::train; }\n",
    );
    assert_eq!(
        paths_after(&code, "crate::"),
        [
            "data::Record",
            "model::bert",
            "model::esm::Esm",
            "eval::metrics::q10"
        ]
    );
    let code = non_test_code(
        "use super::{a::X, Y};\n\
         mod inner { use super::Z; fn f() { super::super::b::g(); } }\n",
    );
    assert_eq!(super_paths(&code), ["a::X", "Y", "b::g"]);
    let mut g = Graph::new();
    g.entry("a".into()).or_default().insert("b".into());
    g.entry("b".into()).or_default().insert("c".into());
    assert_eq!(find_cycle(&g), None);
    g.entry("c".into()).or_default().insert("a".into());
    assert_eq!(find_cycle(&g).unwrap(), ["a", "b", "c", "a"]);
}

#[test]
fn top_level_modules_import_each_other_one_way() {
    let graph = top_level_graph(&src());
    assert!(
        graph.contains_key("model") && graph.contains_key("train"),
        "{graph:?}"
    );
    assert_acyclic(&graph, "src/ (top-level modules)");
}

#[test]
fn kernels_import_nothing_else_of_the_crate() {
    let graph = top_level_graph(&src());
    let Some(deps) = graph.get("kernels") else {
        panic!("src/kernels is missing: CPU compute lives there, apart from the models");
    };
    assert!(deps.is_empty(), "src/kernels imports {deps:?}");
}

#[test]
fn files_inside_model_kernels_and_serve_import_each_other_one_way() {
    for module in ["model", "kernels", "serve"] {
        let dir = src().join(module);
        assert!(dir.is_dir(), "{} is missing", dir.display());
        let graph = file_graph(&dir, module);
        assert!(graph.len() > 2, "{module}: {graph:?}");
        assert_acyclic(&graph, &format!("src/{module}/"));
    }
}
