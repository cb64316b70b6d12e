//! The crate's shape, checked on its source (ARCHITECTURE.md, "Layers"): modules depend one
//! way, with no import cycle, and no file of the library outgrows a reader.
//!
//! The import graph is read from `src/` with a small lexer of our own: comments, strings and
//! `#[cfg(test)]` modules are dropped, then every path into the crate (`crate::…`, `super::…`,
//! `self::…`, a child module's or an imported name's, in `use` trees and in code) is resolved
//! to the module that defines the item it names, following re-exports (`pub use`). An edge
//! A → B means A uses an item of B. A re-export is no use of its own: a parent that only
//! routes its children's names (a facade) depends on none of them, and names that go through
//! it count for the module that defines them. A cycle, at any depth of the module tree, fails
//! the test with the modules in it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// Longest file of the library, tests aside.
const MAX_LINES: usize = 650;

#[test]
fn the_library_has_no_import_cycle() {
    let crate_ = Crate::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let graph = crate_.graph();
    assert!(graph.len() > 20, "the source tree was not read: {graph:?}");
    // `LAYERS=1 cargo test -p cluster-core --test layers -- --nocapture` prints the graph.
    if std::env::var_os("LAYERS").is_some() {
        for (module, deps) in &graph {
            println!("{module:?} -> {deps:?}");
        }
    }
    let cycles = cycles(&graph);
    assert!(cycles.is_empty(), "import cycles between modules:\n{}", show(&cycles, &graph));
}

#[test]
fn no_file_of_the_library_is_over_the_limit() {
    let crate_ = Crate::read(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    let long: Vec<String> = crate_
        .files
        .iter()
        .filter(|(_, f)| !f.test && f.lines > MAX_LINES)
        .map(|(path, f)| format!("{path}: {} lines", f.lines))
        .collect();
    assert!(long.is_empty(), "files over {MAX_LINES} lines (split them by subject): {long:?}");
}

#[test]
fn a_cycle_is_found_and_a_one_way_tree_passes() {
    // The checker itself: a cycle through a re-export is found, at any depth...
    let looped = Crate::from_texts(&[
        ("lib.rs", "mod a; mod b; pub use a::Thing;"),
        ("a.rs", "pub struct Thing; fn f() { crate::b::g(); }"),
        ("b/mod.rs", "mod inner; pub(crate) use inner::g;"),
        ("b/inner.rs", "pub(crate) fn g() { let _ = crate::Thing; }"),
    ]);
    let found = cycles(&looped.graph());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0], ["a", "b::inner"]);
    // ... a glob import of the parent is an edge to the parent ...
    let parent = Crate::from_texts(&[
        ("lib.rs", "mod m;"),
        ("m.rs", "mod child; pub(crate) struct S; fn f() { child::go(); let _ = self::child::X; }"),
        ("m/child.rs", "use super::*; pub(crate) fn go() {} pub(crate) const X: u8 = 0;"),
    ]);
    assert_eq!(cycles(&parent.graph()), [vec!["m".to_string(), "m::child".to_string()]]);
    // ... a facade that re-exports its children, whose children use an item of it, and a
    // visibility path, make none ...
    let facade = Crate::from_texts(&[
        ("lib.rs", "mod s;"),
        ("s/mod.rs", "mod fd; pub(crate) use fd::open; pub(in crate::s) fn check() {}"),
        ("s/fd.rs", "use super::check; pub(in crate::s) fn open() { check() }"),
    ]);
    assert_eq!(cycles(&facade.graph()), Vec::<Vec<String>>::new(), "{:?}", facade.graph());
    // ... while comments, strings, test modules and re-exports through a parent make none.
    let clean = Crate::from_texts(&[
        ("lib.rs", "mod a; mod b; pub use b::B; #[cfg(test)] mod tests;"),
        ("a.rs", "use crate::B; // crate::b::never\npub(crate) fn a() { let _ = \"crate::b::x\"; }"),
        ("b.rs", "pub struct B; /* crate::a::a */ #[cfg(test)] mod tests { fn t() { crate::a::a(); } }"),
        ("tests.rs", "fn t() { crate::a::a(); crate::b::B; }"),
    ]);
    assert_eq!(cycles(&clean.graph()), Vec::<Vec<String>>::new());
}

/// One module's source, with what it declares.
struct File {
    /// Code with comments, strings and test modules blanked out.
    code: String,
    lines: usize,
    /// A test-only module (`#[cfg(test)] mod …;`).
    test: bool,
}

/// Module `a::b` (the root is "") → its file, read from disk or given.
struct Crate {
    files: BTreeMap<String, File>,
}

impl Crate {
    fn read(src: &Path) -> Crate {
        Self::load(|rel| std::fs::read_to_string(src.join(rel)).ok())
    }

    fn from_texts(texts: &[(&str, &str)]) -> Crate {
        let map: HashMap<&str, &str> = texts.iter().copied().collect();
        Self::load(|rel| map.get(rel).map(|t| t.to_string()))
    }

    /// Walks the module tree from `lib.rs`, following `mod name;` declarations.
    fn load(read: impl Fn(&str) -> Option<String>) -> Crate {
        let mut files = BTreeMap::new();
        // (module path, file, directory of its children, test-only)
        let mut todo = vec![(String::new(), "lib.rs".to_string(), String::new(), false)];
        while let Some((module, file, dir, test)) = todo.pop() {
            let Some(text) = read(&file) else { panic!("cannot read {file} (module {module:?})") };
            let lines = text.lines().count();
            let code = strip(&text);
            for (name, is_test, inline) in declared_modules(&code) {
                let child = join(&module, &name);
                if inline {
                    continue;
                }
                let flat = format!("{dir}{name}.rs");
                let nested = format!("{dir}{name}/mod.rs");
                let path = if read(&flat).is_some() { flat } else { nested };
                todo.push((child, path, format!("{dir}{name}/"), test || is_test));
            }
            let code = blank_test_modules(&code);
            files.insert(module, File { code, lines, test });
        }
        Crate { files }
    }

    fn is_module(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    /// Module → the modules it names items of (test-only modules left out).
    fn graph(&self) -> BTreeMap<String, BTreeSet<String>> {
        let mut graph = BTreeMap::new();
        for (module, file) in self.files.iter().filter(|(_, f)| !f.test) {
            let mut deps = BTreeSet::new();
            let imports = self.imports(module);
            for mut path in paths(&file.code) {
                // A path through a name a `use` brought in is that name's path.
                if let Some(alias) = path.first().and_then(|first| imports.get(first.as_str()))
                    && !matches!(path[0].as_str(), "crate" | "super" | "self")
                {
                    path.splice(..1, alias.iter().cloned());
                }
                if let Some(target) = self.resolve(module, &path, 0)
                    && target != *module
                    && self.files.get(&target).is_some_and(|f| !f.test)
                {
                    deps.insert(target);
                }
            }
            graph.insert(module.clone(), deps);
        }
        graph
    }

    /// The module that defines what `path` (written in `from`) names; `None` for other crates.
    fn resolve(&self, from: &str, path: &[String], depth: usize) -> Option<String> {
        if depth > 16 {
            return Some(from.to_string());
        }
        let (mut at, rest) = match path.first().map(String::as_str) {
            Some("crate") => (String::new(), &path[1..]),
            Some("self") => (from.to_string(), &path[1..]),
            Some("super") => {
                let mut at = from.to_string();
                let mut i = 0;
                while path.get(i).map(String::as_str) == Some("super") {
                    at = parent(&at);
                    i += 1;
                }
                (at, &path[i..])
            }
            // A path relative to `from` (in a `use`): a child module, or a name of its own.
            Some(first) => {
                let child = join(from, first);
                if self.is_module(&child) {
                    (child, &path[1..])
                } else if self.defines(from, first) {
                    return Some(from.to_string());
                } else {
                    return None;
                }
            }
            None => return None,
        };
        for (i, seg) in rest.iter().enumerate() {
            let child = join(&at, seg);
            if self.is_module(&child) {
                at = child;
                continue;
            }
            // An item of `at`: its own, or one it imports (a re-export, a glob).
            if self.defines(&at, seg) {
                return Some(at);
            }
            if let Some(alias) = self.imports(&at).get(seg.as_str()) {
                let mut through = alias.clone();
                through.extend_from_slice(&rest[i + 1..]);
                return self.resolve(&at, &through, depth + 1).or(Some(at));
            }
            return Some(at);
        }
        Some(at)
    }

    fn defines(&self, module: &str, name: &str) -> bool {
        self.files.get(module).is_some_and(|f| defined_names(&f.code).contains(name))
    }

    /// What a module's `use` declarations bring in: name → path.
    fn imports(&self, module: &str) -> HashMap<String, Vec<String>> {
        let Some(file) = self.files.get(module) else { return HashMap::new() };
        let mut out = HashMap::new();
        for (_, tree) in use_trees(&file.code) {
            for path in expand(&tree) {
                let name = match path.last().map(String::as_str) {
                    Some("self") if path.len() > 1 => path[path.len() - 2].clone(),
                    Some(name) => name.to_string(),
                    None => continue,
                };
                let path = if path.last().map(String::as_str) == Some("self") {
                    path[..path.len() - 1].to_vec()
                } else {
                    path
                };
                out.insert(name, path);
            }
        }
        out
    }
}

fn join(module: &str, name: &str) -> String {
    if module.is_empty() { name.to_string() } else { format!("{module}::{name}") }
}

fn parent(module: &str) -> String {
    module.rsplit_once("::").map(|(p, _)| p.to_string()).unwrap_or_default()
}

/// The source with comments, string and char literals replaced by spaces (newlines kept).
fn strip(text: &str) -> String {
    let b = text.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, s: &[u8]| out.extend(s.iter().map(|c| if *c == b'\n' { b'\n' } else { b' ' }));
    while i < b.len() {
        let rest = &b[i..];
        if rest.starts_with(b"//") {
            let end = rest.iter().position(|c| *c == b'\n').unwrap_or(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest.starts_with(b"/*") {
            let (mut depth, mut j) = (0, 0);
            while j < rest.len() {
                if rest[j..].starts_with(b"/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with(b"*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, &rest[..j]);
            i += j;
        } else if let Some(len) = raw_string(rest) {
            blank(&mut out, &rest[..len]);
            i += len;
        } else if rest[0] == b'"' || rest.starts_with(b"b\"") {
            let start = if rest[0] == b'b' { 2 } else { 1 };
            let mut j = start;
            while j < rest.len() && rest[j] != b'"' {
                j += if rest[j] == b'\\' { 2 } else { 1 };
            }
            let end = (j + 1).min(rest.len());
            blank(&mut out, &rest[..end]);
            i += end;
        } else if rest[0] == b'\'' {
            // A char literal ('x', '\n', '\u{..}'), not a lifetime ('a).
            let len = if rest.get(1) == Some(&b'\\') {
                rest[2..].iter().position(|c| *c == b'\'').map(|p| p + 3)
            } else {
                (rest.get(2) == Some(&b'\'')).then_some(3)
            };
            match len {
                Some(len) => {
                    blank(&mut out, &rest[..len]);
                    i += len;
                }
                None => {
                    out.push(b'\'');
                    i += 1;
                }
            }
        } else {
            out.push(rest[0]);
            i += 1;
        }
    }
    String::from_utf8(out).expect("ASCII replacements keep UTF-8")
}

/// The length of a raw string literal at the start of `s` (`r"…"`, `r#"…"#`, `br"…"`).
fn raw_string(s: &[u8]) -> Option<usize> {
    let at = if s.starts_with(b"br") {
        2
    } else if s.starts_with(b"r") {
        1
    } else {
        return None;
    };
    let hashes = s[at..].iter().take_while(|c| **c == b'#').count();
    if s.get(at + hashes) != Some(&b'"') {
        return None;
    }
    let close: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
    let body = at + hashes + 1;
    let end = s[body..].windows(close.len()).position(|w| w == close.as_slice())?;
    Some(body + end + close.len())
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Words (identifiers, `$crate`) and single punctuation characters, with byte offsets.
fn tokens(code: &str) -> Vec<(usize, &str)> {
    let b = code.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
        } else if is_ident(c) || (c == b'$' && b.get(i + 1).is_some_and(|n| is_ident(*n))) {
            let start = i;
            i += 1;
            while i < b.len() && is_ident(b[i]) {
                i += 1;
            }
            out.push((start, &code[start..i]));
        } else if code[i..].starts_with("::") {
            out.push((i, "::"));
            i += 2;
        } else {
            let len = code[i..].chars().next().map_or(1, char::len_utf8);
            out.push((i, &code[i..i + len]));
            i += len;
        }
    }
    out
}

/// `mod name;` and `mod name { … }` declarations: (name, under `#[cfg(test)]`, inline).
fn declared_modules(code: &str) -> Vec<(String, bool, bool)> {
    let toks = tokens(code);
    let mut out = Vec::new();
    for (i, (_, t)) in toks.iter().enumerate() {
        if *t != "mod" || !toks.get(i + 1).is_some_and(|(_, n)| n.bytes().all(is_ident)) {
            continue;
        }
        let name = toks[i + 1].1.to_string();
        let inline = toks.get(i + 2).is_some_and(|(_, t)| *t == "{");
        out.push((name, under_cfg_test(&toks, i), inline));
    }
    out
}

/// Whether the item whose keyword is token `i` carries `#[cfg(test)]` (possibly among other
/// attributes and a visibility).
fn under_cfg_test(toks: &[(usize, &str)], i: usize) -> bool {
    let mut j = i;
    // Back over a visibility: `pub`, `pub(crate)`, `pub(super)`.
    while j > 0 && matches!(toks[j - 1].1, "pub" | "(" | ")" | "crate" | "super" | "in" | "self") {
        j -= 1;
    }
    // Back over attributes `#[ … ]`, looking for `cfg(test)`.
    while j > 0 && toks[j - 1].1 == "]" {
        let mut depth = 0;
        let mut k = j - 1;
        loop {
            match toks[k].1 {
                "]" => depth += 1,
                "[" => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ => {}
            }
            if k == 0 {
                return false;
            }
            k -= 1;
        }
        if k == 0 || toks[k - 1].1 != "#" {
            return false;
        }
        let attr: Vec<&str> = toks[k..j].iter().map(|(_, t)| *t).collect();
        if attr.windows(4).any(|w| w == ["cfg", "(", "test", ")"]) {
            return true;
        }
        j = k - 1;
    }
    false
}

/// The code with the bodies of inline `#[cfg(test)] mod … { … }` blanked out.
fn blank_test_modules(code: &str) -> String {
    let toks = tokens(code);
    let mut out = code.as_bytes().to_vec();
    for (i, (_, t)) in toks.iter().enumerate() {
        if *t != "mod" || toks.get(i + 2).is_none_or(|(_, t)| *t != "{") || !under_cfg_test(&toks, i) {
            continue;
        }
        let (start, mut depth) = (toks[i + 2].0, 0);
        for (at, t) in &toks[i + 2..] {
            match *t {
                "{" => depth += 1,
                "}" => {
                    depth -= 1;
                    if depth == 0 {
                        for c in &mut out[start..=*at] {
                            if *c != b'\n' {
                                *c = b' ';
                            }
                        }
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    String::from_utf8(out).expect("ASCII replacements keep UTF-8")
}

/// Names a module defines itself: items and macros.
fn defined_names(code: &str) -> BTreeSet<String> {
    let toks = tokens(code);
    let mut out = BTreeSet::new();
    for (i, (_, t)) in toks.iter().enumerate() {
        let keyword = matches!(*t, "struct" | "enum" | "fn" | "const" | "static" | "type" | "trait" | "union");
        if keyword && let Some((_, name)) = toks.get(i + 1) {
            out.insert(name.to_string());
        }
        if *t == "macro_rules"
            && let Some((_, name)) = toks.get(i + 2)
        {
            out.insert(name.to_string());
        }
    }
    out
}

/// Each `use` tree as tokens, from after `use` to its `;`, and whether it is a re-export
/// (`pub use`, `pub(crate) use`, …).
fn use_trees(code: &str) -> Vec<(bool, Vec<String>)> {
    let toks = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < toks.len() {
        if toks[i].1 == "use" {
            let public = i > 0 && matches!(toks[i - 1].1, "pub" | ")");
            let end = toks[i..].iter().position(|(_, t)| *t == ";").map_or(toks.len(), |p| i + p);
            out.push((public, toks[i + 1..end].iter().map(|(_, t)| t.to_string()).collect()));
            i = end;
        }
        i += 1;
    }
    out
}

/// The paths of a `use` tree: `a::{b, c::{d, self}}` → `a::b`, `a::c::d`, `a::c::self`; a
/// renaming (`x as y`) keeps the path; a glob (`a::*`) is the path of `a`.
fn expand(tree: &[String]) -> Vec<Vec<String>> {
    fn walk(toks: &[String], i: &mut usize, prefix: &[String], out: &mut Vec<Vec<String>>) {
        let mut path = prefix.to_vec();
        while *i < toks.len() {
            match toks[*i].as_str() {
                "{" => {
                    *i += 1;
                    loop {
                        walk(toks, i, &path, out);
                        match toks.get(*i).map(String::as_str) {
                            Some(",") => *i += 1,
                            Some("}") => {
                                *i += 1;
                                return;
                            }
                            _ => return,
                        }
                        if toks.get(*i).map(String::as_str) == Some("}") {
                            *i += 1;
                            return;
                        }
                    }
                }
                "," | "}" => break,
                "::" => *i += 1,
                "*" => {
                    *i += 1;
                    out.push(path.clone());
                    return;
                }
                "as" => *i += 2,
                word => {
                    path.push(word.trim_start_matches('$').to_string());
                    *i += 1;
                }
            }
        }
        if path.len() > prefix.len() {
            out.push(path);
        }
    }
    let mut out = Vec::new();
    let toks: Vec<String> = tree.iter().filter(|t| !matches!(t.as_str(), "pub" | "(" | ")")).cloned().collect();
    let mut i = 0;
    walk(&toks, &mut i, &[], &mut out);
    out
}

/// Every path in `use` trees, and every path of two segments or more in code (`crate::a::f`,
/// `super::X`, `child::f`, `Alias::new`): [`Crate::graph`] keeps those that name a module of
/// the crate.
fn paths(code: &str) -> Vec<Vec<String>> {
    let used = use_trees(code).into_iter().filter(|(public, _)| !public);
    let mut out: Vec<Vec<String>> = used.flat_map(|(_, tree)| expand(&tree)).collect();
    let toks = tokens(code);
    let mut i = 0;
    while i < toks.len() {
        let word = toks[i].1.bytes().all(is_ident) || toks[i].1 == "$crate";
        // Not the rest of a path, of a `use` tree, or of a visibility (`pub(in crate::a)`).
        let inside = i > 0 && matches!(toks[i - 1].1, "use" | "::" | "in");
        if word && !inside && toks.get(i + 1).is_some_and(|(_, t)| *t == "::") {
            let mut path = vec![toks[i].1.trim_start_matches('$').to_string()];
            let mut j = i + 1;
            while toks.get(j).is_some_and(|(_, t)| *t == "::")
                && let Some((_, word)) = toks.get(j + 1)
                && word.bytes().all(is_ident)
            {
                path.push(word.to_string());
                j += 2;
            }
            out.push(path);
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// The strongly connected components with more than one module (Tarjan), each sorted.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Tarjan<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: HashMap<&'a str, usize>,
        low: HashMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    impl<'a> Tarjan<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.graph.contains_key(w) {
                    continue;
                }
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    scc.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t = Tarjan {
        graph,
        index: HashMap::new(),
        low: HashMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in graph.keys() {
        if !t.index.contains_key(v.as_str()) {
            t.visit(v);
        }
    }
    t.out.sort();
    t.out
}

/// Each cycle with the edges inside it, for the failure message.
fn show(cycles: &[Vec<String>], graph: &BTreeMap<String, BTreeSet<String>>) -> String {
    let mut out = String::new();
    for scc in cycles {
        let name = |m: &str| if m.is_empty() { "crate".to_string() } else { m.to_string() };
        out.push_str(&format!("- {}\n", scc.iter().map(|m| name(m)).collect::<Vec<_>>().join(", ")));
        for from in scc {
            for to in graph[from].iter().filter(|to| scc.contains(to)) {
                out.push_str(&format!("    {} -> {}\n", name(from), name(to)));
            }
        }
    }
    out
}
