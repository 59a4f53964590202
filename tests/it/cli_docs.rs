//! docs/cli.md against the binary: its reference section is every command's
//! `--help`, subcommands included, exactly as `llama` prints it. A flag added, changed
//! or removed without the page following fails here; to regenerate the reference,
//! run `LLAMA_UPDATE_DOCS=1 cargo test --test it cli_docs` and review the diff.
use std::path::PathBuf;
use std::process::Command;

/// The comment that opens the generated part of docs/cli.md; everything after it is
/// written by [`reference`].
const MARKER: &str = "<!-- Generated from `llama <command> --help` by tests/it/cli_docs.rs";

fn help(command: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_llama"))
        .args(command)
        .arg("--help")
        .env("NO_COLOR", "1")
        .env_remove("CLICOLOR_FORCE")
        .output()
        .expect("the binary runs");
    assert!(
        out.status.success(),
        "llama {} --help failed: {}",
        command.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("help is UTF-8")
}

/// The names under a help text's `Commands:` heading, `help` aside.
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| l.trim_end() != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_string)
        .collect()
}

/// Every command's help, depth first from `llama` itself, as markdown sections.
fn reference() -> String {
    let mut out = String::new();
    let mut stack = vec![Vec::<String>::new()];
    while let Some(command) = stack.pop() {
        let text = help(&command);
        let title = std::iter::once("llama")
            .chain(command.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join(" ");
        out.push_str(&format!(
            "\n### `{title}`\n\n```text\n{}\n```\n",
            text.trim_end()
        ));
        for sub in subcommands(&text).into_iter().rev() {
            let mut path = command.clone();
            path.push(sub);
            stack.push(path);
        }
    }
    out
}

#[test]
fn cli_md_is_every_commands_help() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/cli.md");
    let page = std::fs::read_to_string(&path).expect("docs/cli.md");
    let at = page
        .find(MARKER)
        .expect("docs/cli.md has the generated reference's marker comment");
    let end = at + page[at..].find("-->").expect("the marker comment ends") + "-->".len();
    let want = format!("{}\n{}", &page[..end], reference());
    if page == want {
        return;
    }
    if std::env::var_os("LLAMA_UPDATE_DOCS").is_some() {
        std::fs::write(&path, &want).expect("write docs/cli.md");
        return;
    }
    let first = page
        .lines()
        .zip(want.lines())
        .position(|(a, b)| a != b)
        .unwrap_or_else(|| page.lines().count().min(want.lines().count()));
    panic!(
        "docs/cli.md does not match `llama <command> --help` (first difference at line {}: \
         {:?} where the binary gives {:?}); regenerate it with \
         `LLAMA_UPDATE_DOCS=1 cargo test --test it cli_docs` and review `git diff docs/cli.md`",
        first + 1,
        page.lines().nth(first).unwrap_or("<end of file>"),
        want.lines().nth(first).unwrap_or("<end of file>"),
    );
}

#[test]
fn the_reference_reaches_every_command() {
    let commands = subcommands(&help(&[]));
    for name in [
        "generate", "chat", "serve", "embed", "rag", "agent", "bench", "devices",
    ] {
        assert!(
            commands.iter().any(|c| c == name),
            "`llama --help` lists no `{name}`: {commands:?}"
        );
    }
    let rag = subcommands(&help(&["rag".to_string()]));
    assert!(
        ["ingest", "search", "query"]
            .iter()
            .all(|s| rag.iter().any(|c| c == s)),
        "rag's subcommands: {rag:?}"
    );
}
