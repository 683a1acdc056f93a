//! Running the rule tools (`nft`, `iptables-restore`, ...): one process per
//! batch, the batch on stdin, the tool's complaint kept for the error.

use std::io::Write;
use std::process::{Command, Stdio};

use super::RedirectError;

/// How much of a tool's stderr an error keeps: a failed batch can echo
/// long lines back.
const STDERR_KEEP: usize = 2048;

/// Run `program args`, feeding `stdin`; its stdout on success.
pub fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, RedirectError> {
    let spawn_error = |source| RedirectError::Spawn { program: program.to_string(), source };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    let output = std::thread::scope(|scope| {
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A writer of its own, so a tool that answers before reading all
            // of a large batch cannot deadlock us. A write error shows up as
            // the tool's own failure.
            scope.spawn(move || {
                let _ = pipe.write_all(text.as_bytes());
            });
        }
        child.wait_with_output()
    })
    .map_err(spawn_error)?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let mut stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    if stderr.len() > STDERR_KEEP {
        let cut = (0..=STDERR_KEEP).rev().find(|i| stderr.is_char_boundary(*i)).unwrap_or(0);
        stderr.truncate(cut);
        stderr.push_str(" [...]");
    }
    Err(RedirectError::Failed {
        program: program.to_string(),
        args: args.join(" "),
        status: output.status,
        stderr,
    })
}

/// Whether `program args` runs and succeeds.
pub fn works(program: &str, args: &[&str]) -> bool {
    run(program, args, None).is_ok()
}
