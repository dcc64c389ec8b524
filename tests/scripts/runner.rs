//! A small golden-script runner: a test is a text file of commands, each
//! block of commands followed by the output it is expected to print.
//!
//! ```text
//! # Comments start with '#'; blank lines separate blocks.
//! cluster nodes=3
//! ---
//! n1@0 follower last=0@0 commit=0
//! ...
//!
//! propose 1 "hello" client=7
//! ---
//! ...
//! ```
//!
//! A block is one or more command lines (comment lines may sit among
//! them), a line `---`, and the expected output, which runs to the next
//! blank line (so output never holds a blank line). A block without `---`
//! expects nothing, which is how a new block is written: run with
//! `UPDATE_GOLDEN=1` and the runner fills it in.
//!
//! A command line is a name and its arguments, separated by spaces:
//! positional words (`1`, `2,3`, `hold`), `key=value` options, and
//! double-quoted strings (`"two words"`, `\"` and `\\` escaped) as words
//! or option values. What the words mean is up to the [`Driver`]; a
//! command it does not understand (or an argument it does not take) fails
//! the test at that line.
//!
//! Without `UPDATE_GOLDEN`, every block's output must match; a mismatch
//! fails the test with a line diff of each block that changed. With
//! `UPDATE_GOLDEN=1` the file is rewritten with what the commands printed
//! (comments, commands and blank lines kept), so a behaviour change shows
//! up as a readable diff in `git diff`.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::path::Path;

/// Carries out commands; one driver runs one script from its start.
pub trait Driver {
    /// Runs `command` and returns what it printed. An `Err` is a mistake
    /// in the script itself (unknown command, bad argument): it fails the
    /// test, naming the line. Behaviour worth seeing (a refused proposal,
    /// a lost election) belongs in the output instead.
    fn run(&mut self, command: &mut Command) -> Result<String, String>;
}

/// One parsed command line.
#[derive(Debug)]
pub struct Command {
    pub name: String,
    /// The line as written, for messages.
    pub text: String,
    /// Line number in the script (1-based).
    pub line: usize,
    positional: VecDeque<String>,
    options: BTreeMap<String, String>,
}

impl Command {
    pub fn parse(text: &str, line: usize) -> Result<Command, String> {
        let mut words = tokenize(text)?.into_iter();
        let (name, quoted) = words.next().ok_or("empty command")?;
        if quoted {
            return Err("a command name cannot be quoted".into());
        }
        let mut positional = VecDeque::new();
        let mut options = BTreeMap::new();
        for (word, quoted) in words {
            match word.split_once('=') {
                Some((key, value)) if !quoted && !key.is_empty() => {
                    let value = match tokenize(value)?.as_slice() {
                        [(v, _)] => v.clone(),
                        [] => String::new(),
                        _ => return Err(format!("bad value in {word}")),
                    };
                    if options.insert(key.to_string(), value).is_some() {
                        return Err(format!("option {key} given twice"));
                    }
                }
                _ => positional.push_back(word),
            }
        }
        Ok(Command {
            name,
            text: text.to_string(),
            line,
            positional,
            options,
        })
    }

    /// The next positional word, if any.
    pub fn next(&mut self) -> Option<String> {
        self.positional.pop_front()
    }

    /// The next positional word, which must be there.
    pub fn required(&mut self, what: &str) -> Result<String, String> {
        self.next().ok_or_else(|| format!("missing {what}"))
    }

    /// Takes the bare word `flag` if it was given (anywhere).
    pub fn flag(&mut self, flag: &str) -> bool {
        match self.positional.iter().position(|w| w == flag) {
            Some(at) => {
                self.positional.remove(at);
                true
            }
            None => false,
        }
    }

    /// Takes option `key=...` if it was given.
    pub fn option(&mut self, key: &str) -> Option<String> {
        self.options.remove(key)
    }

    /// Takes option `key` parsed with `FromStr`.
    pub fn parsed<T: std::str::FromStr>(&mut self, key: &str) -> Result<Option<T>, String> {
        self.option(key)
            .map(|v| v.parse().map_err(|_| format!("bad value for {key}: {v}")))
            .transpose()
    }

    /// Fails if any argument was left untaken: a typo must not be ignored.
    pub fn finish(&self) -> Result<(), String> {
        let mut left: Vec<String> = self.positional.iter().cloned().collect();
        left.extend(self.options.keys().map(|k| format!("{k}=")));
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("unexpected arguments: {}", left.join(" ")))
        }
    }
}

/// Splits a line into words, honouring double quotes; the flag says
/// whether the word was quoted.
fn tokenize(text: &str) -> Result<Vec<(String, bool)>, String> {
    let mut words = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let Some(&first) = chars.peek() else {
            return Ok(words);
        };
        let mut word = String::new();
        let mut quoted = false;
        if first == '"' {
            quoted = true;
            chars.next();
            loop {
                match chars.next() {
                    Some('"') => break,
                    Some('\\') => match chars.next() {
                        Some(c @ ('"' | '\\')) => word.push(c),
                        Some('n') => word.push('\n'),
                        _ => return Err("bad escape in quoted string".into()),
                    },
                    Some(c) => word.push(c),
                    None => return Err("unterminated quoted string".into()),
                }
            }
            if chars.peek().is_some_and(|c| !c.is_whitespace()) {
                return Err("a quoted string must end its word".into());
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                if c == '"' {
                    // key="quoted value": keep the quotes for the value.
                    chars.next();
                    word.push('"');
                    loop {
                        match chars.next() {
                            Some('"') => break,
                            Some('\\') => {
                                word.push('\\');
                                word.push(chars.next().ok_or("bad escape")?);
                            }
                            Some(c) => word.push(c),
                            None => return Err("unterminated quoted string".into()),
                        }
                    }
                    word.push('"');
                    continue;
                }
                word.push(c);
                chars.next();
            }
        }
        words.push((word, quoted));
    }
}

/// A block of the script: the lines before its commands (comments, blank
/// lines), its command lines, and the output it expects.
struct Block {
    preamble: Vec<String>,
    /// Command lines and comments among them, as written.
    lines: Vec<(usize, String)>,
    expected: Vec<String>,
    /// Line number of the `---`, or of the first command if there is none.
    at: usize,
}

fn is_comment(line: &str) -> bool {
    line.trim_start().starts_with('#')
}

/// Splits a script into blocks, and the comments after the last one.
fn parse(text: &str) -> (Vec<Block>, Vec<String>) {
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks = Vec::new();
    let mut i = 0;
    loop {
        let mut preamble = Vec::new();
        while i < lines.len() && (lines[i].trim().is_empty() || is_comment(lines[i])) {
            preamble.push(lines[i].to_string());
            i += 1;
        }
        if i == lines.len() {
            return (blocks, preamble);
        }
        let mut commands = Vec::new();
        while i < lines.len() && !lines[i].trim().is_empty() && lines[i].trim() != "---" {
            commands.push((i + 1, lines[i].to_string()));
            i += 1;
        }
        let mut at = commands.first().map_or(i + 1, |(n, _)| *n);
        let mut expected = Vec::new();
        if i < lines.len() && lines[i].trim() == "---" {
            at = i + 1;
            i += 1;
            while i < lines.len() && !lines[i].trim().is_empty() {
                expected.push(lines[i].to_string());
                i += 1;
            }
        }
        // The blank line that ends the block.
        if i < lines.len() && lines[i].trim().is_empty() {
            i += 1;
        }
        blocks.push(Block {
            preamble,
            lines: commands,
            expected,
            at,
        });
    }
}

/// Runs the script at `path` through `driver`; see the module docs.
pub fn run_script(path: &Path, driver: &mut dyn Driver) {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let name = path.display();
    let (blocks, trailing) = parse(&text);
    let mut rewritten = String::new();
    let mut failures = String::new();
    for (n, block) in blocks.iter().enumerate() {
        let mut actual = Vec::new();
        for (line, command) in &block.lines {
            if is_comment(command) {
                continue;
            }
            let mut parsed = Command::parse(command.trim(), *line)
                .unwrap_or_else(|e| panic!("{name}:{line}: {e}: {command}"));
            // A panic inside the driver (a harness assertion) names the
            // script line that led to it.
            let run =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| driver.run(&mut parsed)));
            let output = match run {
                Ok(Ok(output)) => output,
                Ok(Err(e)) => panic!("{name}:{line}: {e}: {command}"),
                Err(panic) => {
                    let why = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)");
                    panic!("{name}:{line}: `{}` panicked: {why}", command.trim())
                }
            };
            for out in output.lines() {
                assert!(
                    !out.trim().is_empty(),
                    "{name}:{line}: the driver printed a blank line (output ends at one)"
                );
                actual.push(out.trim_end().to_string());
            }
        }
        for line in &block.preamble {
            writeln!(rewritten, "{line}").unwrap();
        }
        for (_, line) in &block.lines {
            writeln!(rewritten, "{line}").unwrap();
        }
        writeln!(rewritten, "---").unwrap();
        for line in &actual {
            writeln!(rewritten, "{line}").unwrap();
        }
        if n + 1 < blocks.len() || !trailing.is_empty() {
            writeln!(rewritten).unwrap();
        }
        let expected: Vec<String> = block
            .expected
            .iter()
            .map(|l| l.trim_end().to_string())
            .collect();
        if expected != actual {
            let commands: Vec<&str> = block.lines.iter().map(|(_, l)| l.as_str()).collect();
            writeln!(
                failures,
                "{name}:{}: output of\n    {}\nchanged (- expected, + actual):",
                block.at,
                commands.join("\n    ")
            )
            .unwrap();
            failures.push_str(&diff(&expected, &actual));
            failures.push('\n');
        }
    }
    for line in &trailing {
        writeln!(rewritten, "{line}").unwrap();
    }
    if std::env::var_os("UPDATE_GOLDEN").is_some_and(|v| !v.is_empty() && v != "0") {
        if rewritten != text {
            std::fs::write(path, rewritten)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        }
        return;
    }
    assert!(
        failures.is_empty(),
        "\n{failures}If the new output is right, rewrite the expectations with\n    UPDATE_GOLDEN=1 cargo test --test {}\nand review them with git diff.\n",
        env!("CARGO_CRATE_NAME")
    );
}

/// A line diff (longest common subsequence): `-` expected only, `+`
/// actual only, two spaces for lines in both.
fn diff(expected: &[String], actual: &[String]) -> String {
    let (n, m) = (expected.len(), actual.len());
    let mut common = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            common[i][j] = if expected[i] == actual[j] {
                common[i + 1][j + 1] + 1
            } else {
                common[i + 1][j].max(common[i][j + 1])
            };
        }
    }
    let mut out = String::new();
    let (mut i, mut j) = (0, 0);
    while i < n || j < m {
        if i < n && j < m && expected[i] == actual[j] {
            writeln!(out, "    {}", expected[i]).unwrap();
            i += 1;
            j += 1;
        } else if i < n && (j == m || common[i + 1][j] >= common[i][j + 1]) {
            writeln!(out, "  - {}", expected[i]).unwrap();
            i += 1;
        } else {
            writeln!(out, "  + {}", actual[j]).unwrap();
            j += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_options_and_quotes() {
        let mut c = Command::parse(r#"propose 1 "a \"b\"" client=7 text="x y" hold"#, 3).unwrap();
        assert_eq!(c.name, "propose");
        assert!(c.flag("hold"));
        assert_eq!(c.next().as_deref(), Some("1"));
        assert_eq!(c.next().as_deref(), Some(r#"a "b""#));
        assert_eq!(c.option("client").as_deref(), Some("7"));
        assert_eq!(c.option("text").as_deref(), Some("x y"));
        assert!(c.finish().is_ok());
        let c = Command::parse("tick 1 bogus=2", 1).unwrap();
        assert!(c.finish().is_err());
    }

    #[test]
    fn blocks_keep_their_comments_and_expectations() {
        let text = "# intro\n\ncmd a\n# why\ncmd b\n---\nout 1\nout 2\n\nnew\n\n# end\n";
        let (blocks, trailing) = parse(text);
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0].preamble, ["# intro", ""]);
        assert_eq!(blocks[0].lines.len(), 3);
        assert_eq!(blocks[0].expected, ["out 1", "out 2"]);
        assert!(blocks[1].expected.is_empty());
        assert_eq!(trailing, ["# end"]);
    }
}
