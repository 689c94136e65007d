//! Every relative link in `README.md` and `docs/*.md` resolves: the file
//! or folder it names exists, and a `#anchor` into a Markdown file names
//! one of its headings, slugged as GitHub slugs them (lowercase; letters,
//! digits, `-` and `_` kept; spaces become `-`; everything else dropped;
//! a repeated heading gets `-1`, `-2`, ...). Links with a scheme
//! (`https:`, `mailto:`) are not followed, and an anchor into a file that
//! is not Markdown (a `#L10` into source) is not checked.
//!
//! Trust: the Markdown is the project's own; the parser is deliberately
//! small (inline links, images and reference definitions outside code
//! fences and code spans), which is all these pages use. The checker's
//! own tests below make it find a broken file link and a broken anchor,
//! so a checker that finds nothing cannot pass for one that works.

use std::collections::HashSet;
use std::fs;
use std::path::{Component, Path, PathBuf};

/// The repository root (this test belongs to the `vmm` package).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("vmm/ has a parent").to_path_buf()
}

/// The pages the check covers: the README and every Markdown file in docs/.
fn pages(root: &Path) -> Vec<PathBuf> {
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root.join("docs"))
        .expect("docs/ is readable")
        .map(|entry| entry.expect("docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The lines of a page that are prose: fenced code blocks blanked out
/// (their line numbers kept), code spans removed.
fn prose_lines(text: &str) -> Vec<String> {
    let mut in_fence = false;
    text.lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
                in_fence = !in_fence;
                return String::new();
            }
            if in_fence {
                return String::new();
            }
            strip_code_spans(line)
        })
        .collect()
}

/// `line` without its code spans (text between matching runs of backticks).
fn strip_code_spans(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(start) = rest.find('`') {
        out.push_str(&rest[..start]);
        let ticks = rest[start..].chars().take_while(|&c| c == '`').count();
        let fence = "`".repeat(ticks);
        let after = &rest[start + ticks..];
        match after.find(&fence) {
            Some(end) => rest = &after[end + ticks..],
            None => {
                // An unmatched run is literal text.
                out.push_str(&rest[start..start + ticks]);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The link targets on one prose line: inline links and images
/// (`[text](target "title")`) and reference definitions (`[label]: target`).
fn link_targets(line: &str) -> Vec<String> {
    let mut targets = Vec::new();
    let trimmed = line.trim_start();
    if trimmed.starts_with('[')
        && let Some(end) = trimmed.find("]:")
        && let Some(target) = trimmed[end + 2..].split_whitespace().next()
    {
        targets.push(target.trim_matches(|c| c == '<' || c == '>').to_string());
    }
    let mut rest = line;
    while let Some(start) = rest.find("](") {
        let after = &rest[start + 2..];
        let target = if let Some(inner) = after.strip_prefix('<') {
            inner.split('>').next().unwrap_or("")
        } else {
            // Up to the closing parenthesis (balanced: a target may hold a
            // pair), or a space before a title.
            let mut depth = 0usize;
            let end = after
                .char_indices()
                .find(|&(_, c)| match c {
                    '(' => {
                        depth += 1;
                        false
                    }
                    ')' if depth == 0 => true,
                    ')' => {
                        depth -= 1;
                        false
                    }
                    c => c.is_whitespace(),
                })
                .map_or(after.len(), |(i, _)| i);
            &after[..end]
        };
        targets.push(target.to_string());
        rest = after;
    }
    targets
}

/// GitHub's anchor for a heading's text.
fn slug(heading: &str) -> String {
    // A link in a heading contributes its text only.
    let mut text = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        text.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        match (after.find("]("), after.find(')')) {
            (Some(close), Some(paren)) if paren > close => {
                text.push_str(&after[..close]);
                rest = &after[paren + 1..];
            }
            _ => {
                text.push('[');
                rest = after;
            }
        }
    }
    text.push_str(rest);
    text.trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// Every anchor a Markdown page offers: its headings' slugs, with
/// GitHub's `-N` suffix on repeats.
fn anchors(text: &str) -> HashSet<String> {
    let mut seen = HashSet::new();
    let mut in_fence = false;
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
            continue;
        }
        if in_fence || !line.starts_with('#') {
            continue;
        }
        let hashes = line.chars().take_while(|&c| c == '#').count();
        let Some(title) = line[hashes..].strip_prefix(' ') else { continue };
        if hashes > 6 {
            continue;
        }
        let base = slug(title.trim_end_matches('#'));
        let mut anchor = base.clone();
        let mut n = 0;
        while seen.contains(&anchor) {
            n += 1;
            anchor = format!("{base}-{n}");
        }
        seen.insert(anchor);
    }
    seen
}

/// `path` with `.` and `..` resolved lexically (the target need not exist).
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

/// One line per link in `page` that does not resolve: `page:line: target: why`.
fn broken_links(page: &Path) -> Vec<String> {
    let text = fs::read_to_string(page).unwrap_or_else(|e| panic!("{}: {e}", page.display()));
    let dir = page.parent().expect("a page has a folder");
    let mut broken = Vec::new();
    for (number, line) in prose_lines(&text).iter().enumerate() {
        for target in link_targets(line) {
            let has_scheme = target.split_once(':').is_some_and(|(scheme, _)| {
                !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            });
            if has_scheme || target.starts_with("//") {
                continue;
            }
            let (file, anchor) = match target.split_once('#') {
                Some((file, anchor)) => (file, Some(anchor)),
                None => (target.as_str(), None),
            };
            let where_ = format!("{}:{}: {target}", page.display(), number + 1);
            if target.is_empty() {
                broken.push(format!("{where_}: empty link"));
                continue;
            }
            let resolved = if file.is_empty() { page.to_path_buf() } else { normalise(&dir.join(file)) };
            if !resolved.exists() {
                broken.push(format!("{where_}: no such file {}", resolved.display()));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if resolved.extension().is_none_or(|ext| ext != "md") {
                continue;
            }
            let target_text = fs::read_to_string(&resolved).unwrap_or_default();
            if !anchors(&target_text).contains(anchor) {
                broken.push(format!("{where_}: no heading with anchor #{anchor} in {}", resolved.display()));
            }
        }
    }
    broken
}

#[test]
fn every_relative_link_in_the_readme_and_docs_resolves() {
    let root = repo_root();
    let pages = pages(&root);
    assert!(pages.len() > 2, "the README and docs/ were found: {pages:?}");
    let broken: Vec<String> = pages.iter().flat_map(|page| broken_links(page)).collect();
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_checker_finds_a_missing_file_and_a_missing_anchor() {
    let dir = std::env::temp_dir().join(format!("mmuvirt-doc-links-{}", std::process::id()));
    fs::create_dir_all(dir.join("docs")).unwrap();
    fs::write(dir.join("docs/other.md"), "# Other page\n\n## The `vmm run` command: options\n").unwrap();
    let page = dir.join("README.md");
    fs::write(
        &page,
        "# Title\n\n\
         [fine](docs/other.md) [fine](docs/other.md#the-vmm-run-command-options) [fine](#title)\n\
         [gone](docs/missing.md) and [bad anchor](docs/other.md#no-such-heading)\n\
         `[in code](docs/missing-too.md)` [web](https://example.com/x) ![img](docs/no.svg)\n\
         ```\n[in a fence](docs/missing-three.md)\n```\n\
         [ref]: docs/gone-ref.md\n",
    )
    .unwrap();
    let broken = broken_links(&page);
    fs::remove_dir_all(&dir).unwrap();
    assert_eq!(broken.len(), 4, "{broken:#?}");
    assert!(broken[0].contains("docs/missing.md: no such file"), "{broken:#?}");
    assert!(broken[1].contains("no heading with anchor #no-such-heading"), "{broken:#?}");
    assert!(broken[2].contains("docs/no.svg: no such file"), "{broken:#?}");
    assert!(broken[3].contains("docs/gone-ref.md: no such file"), "{broken:#?}");
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(slug("How to read `--stats`"), "how-to-read---stats");
    assert_eq!(
        slug("mmuvirt — see, measure and teach MMU virtualisation"),
        "mmuvirt--see-measure-and-teach-mmu-virtualisation"
    );
    assert_eq!(slug("What the nested hosts' times mean"), "what-the-nested-hosts-times-mean");
    assert_eq!(
        slug("Nested hosts: NPT and KVM's shadow MMU inside QEMU"),
        "nested-hosts-npt-and-kvms-shadow-mmu-inside-qemu"
    );
    assert_eq!(slug("See [pv mode](docs/pv.md) here"), "see-pv-mode-here");
    let repeated = anchors("# A\n## Notes\n## Notes\n```\n## Not a heading\n```\n");
    assert!(repeated.contains("notes") && repeated.contains("notes-1") && !repeated.contains("not-a-heading"));
}
