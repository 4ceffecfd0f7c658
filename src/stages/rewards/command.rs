//! `--reward cmd:PROGRAM`: a long-lived process, started with `sh -c PROGRAM`, that reads one
//! JSON request per line on stdin and writes one `{"reward": number}` per line on stdout, in
//! order. A batch is written whole and then read back, so the process may batch internally.
//! A process that dies or hangs (no reply within `timeout_s`) is restarted and the batch
//! retried, at most `max_restarts` times in a run; a reply that is not a reward stops the run
//! at once (retrying a program's bug would only hide it).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::{clip, parse_reply, External};
use crate::config::ExternalRewardConfig;

pub struct CommandReward {
    cmd: String,
    timeout: Duration,
    max_restarts: usize,
    restarts: usize,
    proc: Option<Proc>,
}

struct Proc {
    child: Child,
    /// Taken by the writer thread of a batch and given back when it is done.
    stdin: Option<ChildStdin>,
    /// Lines of the process's stdout, read by a thread so a hung process cannot block us.
    lines: Receiver<std::io::Result<String>>,
}

/// Why a batch failed.
enum Failure {
    /// Died or hung: worth a restart.
    Lost(String),
    /// Answered something that is not a reward: a bug in the program.
    Garbage(anyhow::Error),
}

impl CommandReward {
    pub fn start(cmd: &str, cfg: &ExternalRewardConfig) -> Result<Self> {
        let mut r = Self {
            cmd: cmd.to_string(),
            timeout: Duration::from_secs_f64(cfg.timeout_s),
            max_restarts: cfg.max_restarts,
            restarts: 0,
            proc: None,
        };
        r.proc = Some(r.spawn()?);
        Ok(r)
    }

    fn spawn(&self) -> Result<Proc> {
        // Its own process group, so that killing it reaches whatever `sh -c` started, and a
        // Ctrl-C to the terminal's group does not end it while the run finishes its step.
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(&self.cmd)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SIGKILL from the kernel when the run dies outright (SIGKILL, the OOM killer), which
        // no code of the run survives to send. A program the shell started in turn sees its
        // input close, and one that execs in the shell's place (`cmd:exec python3 v.py`) is
        // killed with it.
        crate::dist::launch::signal_when_parent_dies(&mut cmd, libc::SIGKILL);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{}`", self.cmd))?;
        if let Ok(pgid) = i32::try_from(child.id()) {
            crate::dist::preempt::kill_group_on_stop(pgid);
        }
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Proc {
            child,
            stdin: Some(stdin),
            lines,
        })
    }

    fn try_batch(&mut self, requests: &[Value]) -> std::result::Result<Vec<f64>, Failure> {
        let proc = self.proc.as_mut().expect("started");
        // A line already waiting answers no request of this batch: the last batch's replies
        // came with one too many, which would shift every reward from here on by one.
        proc.refuse_extra_line(" (one came after the last batch's replies)", Duration::ZERO)?;
        let started = Instant::now();
        let mut text = String::new();
        for r in requests {
            text.push_str(&r.to_string());
            text.push('\n');
        }
        // Written from a thread: a process that stops reading would otherwise block the
        // write (a batch outgrows the pipe's buffer) before the deadline starts.
        let Some(mut stdin) = proc.stdin.take() else {
            return Err(Failure::Lost("its input is closed".into()));
        };
        let writer = std::thread::spawn(move || {
            let r = stdin.write_all(text.as_bytes()).and_then(|_| stdin.flush());
            (stdin, r)
        });
        // Each reply within the timeout of the one before: a program slow but steady over a
        // large batch is not hung.
        let mut deadline = Instant::now() + self.timeout;
        let mut out = Vec::with_capacity(requests.len());
        for i in 0..requests.len() {
            let wait = deadline.saturating_duration_since(Instant::now());
            let line = match proc.lines.recv_timeout(wait) {
                Ok(Ok(line)) => line,
                Ok(Err(e)) => return Err(Failure::Lost(format!("reading its reply: {e}"))),
                Err(RecvTimeoutError::Timeout) => {
                    return Err(Failure::Lost(format!(
                        "no reply to request {} of {} within {} s of {} ([external_reward] \
                         timeout_s)",
                        i + 1,
                        requests.len(),
                        self.timeout.as_secs_f64(),
                        match i {
                            0 => "the batch",
                            _ => "the reply before",
                        }
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(Failure::Lost(format!(
                        "it closed its output after {i} of {} replies{}",
                        requests.len(),
                        exit_note(proc)
                    )))
                }
            };
            let what = format!("reply {} of {}", i + 1, requests.len());
            let v: Value = serde_json::from_str(&line).map_err(|e| {
                Failure::Garbage(anyhow!("{what} is not JSON ({e}): {}", clip(&line)))
            })?;
            out.push(parse_reply(&v, &what).map_err(Failure::Garbage)?);
            deadline = Instant::now() + self.timeout;
        }
        // Every reply came, so the process read the whole batch and the writer is done.
        match writer.join() {
            Ok((stdin, Ok(()))) => proc.stdin = Some(stdin),
            Ok((_, Err(e))) => return Err(Failure::Lost(format!("cannot write to it ({e})"))),
            Err(_) => return Err(Failure::Lost("its writer thread panicked".into())),
        }
        // A line more than was asked for would be taken as the next batch's first reply, and
        // says this batch's replies may not be in step with its requests. A program that
        // answers twice writes its lines together, so a short wait finds the extra one still
        // on its way (without it, a job's only or last batch was taken as it came): a tenth of
        // the batch's time, from 2 to 50 ms.
        let grace =
            (started.elapsed() / 10).clamp(Duration::from_millis(2), Duration::from_millis(50));
        proc.refuse_extra_line("", grace)?;
        Ok(out)
    }

    fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            // The group's id is the shell's pid (process_group(0) above).
            if let Ok(pgid) = i32::try_from(p.child.id()) {
                // SAFETY: kill(2) with a negative pid signals that process group; no memory
                // is involved.
                unsafe {
                    libc::kill(-pgid, libc::SIGKILL);
                }
                crate::dist::preempt::forget_group(pgid);
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

impl Proc {
    /// A reply waiting beyond the ones asked for, or arriving within `wait`, refused (`when`
    /// says where it was met).
    fn refuse_extra_line(&self, when: &str, wait: Duration) -> std::result::Result<(), Failure> {
        match self.lines.recv_timeout(wait) {
            Ok(Ok(extra)) => Err(Failure::Garbage(anyhow!(
                "answered more lines than requests{when}: {}",
                clip(&extra)
            ))),
            _ => Ok(()),
        }
    }
}

/// ", exited with STATUS" when the process has ended.
fn exit_note(proc: &mut Proc) -> String {
    // A process that just closed its pipes may need a moment to be reaped.
    for _ in 0..20 {
        if let Ok(Some(status)) = proc.child.try_wait() {
            return format!("; it exited with {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    String::new()
}

impl External for CommandReward {
    fn score(&mut self, requests: &[Value]) -> Result<Vec<f64>> {
        loop {
            if self.proc.is_none() {
                self.proc = Some(self.spawn()?);
            }
            match self.try_batch(requests) {
                Ok(v) => return Ok(v),
                Err(Failure::Garbage(e)) => {
                    self.kill();
                    return Err(e.context(format!("`{}` answered garbage", self.cmd)));
                }
                Err(Failure::Lost(why)) => {
                    self.kill();
                    if self.restarts >= self.max_restarts {
                        bail!(
                            "`{}`: {why}; gave up after {} restart(s) ([external_reward] max_restarts)",
                            self.cmd,
                            self.restarts
                        );
                    }
                    self.restarts += 1;
                    errln!(
                        "warning: reward process `{}`: {why}; restarting it ({} of {})",
                        self.cmd,
                        self.restarts,
                        self.max_restarts
                    );
                }
            }
        }
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reward(program: &str, timeout_s: f64) -> CommandReward {
        let cfg = ExternalRewardConfig {
            timeout_s,
            max_restarts: 0,
        };
        CommandReward::start(program, &cfg).unwrap()
    }

    /// A program that answers one request twice is stopped by the batch whose replies it
    /// wrote (a job's only batch too), or else by the next one before it sends: every later
    /// reply would otherwise score the request before its own.
    #[test]
    fn one_reply_too_many_stops_the_run() {
        // A batch of 0.3 s waits 30 ms for a line more.
        let program = r#"read l; sleep 0.3; printf '{"reward": 1}\n{"reward": 2}\n'; read l"#;
        let mut r = reward(program, 10.0);
        let e = r.score(&[serde_json::json!({"prompt": "p"})]).unwrap_err();
        assert!(
            format!("{e:#}").contains("answered more lines than requests"),
            "{e:#}"
        );
        let program = r#"read l; echo '{"reward": 1}'; sleep 0.2; echo '{"reward": 2}'; while read l; do echo '{"reward": 3}'; done"#;
        let mut r = reward(program, 10.0);
        let request = [serde_json::json!({"prompt": "p"})];
        let first = r.score(&request);
        std::thread::sleep(Duration::from_secs(1));
        let e = match first {
            Err(e) => e,
            Ok(v) => {
                assert_eq!(v, [1.0]);
                r.score(&request)
                    .expect_err("the extra reply is no answer to this batch")
            }
        };
        assert!(
            format!("{e:#}").contains("answered more lines than requests"),
            "{e:#}"
        );
    }

    /// The timeout bounds the wait for each reply, not the batch: a program slower over the
    /// whole batch than the timeout, but steady, is not hung.
    #[test]
    fn a_slow_but_steady_program_is_not_hung() {
        let program = r#"while read l; do sleep 0.5; echo '{"reward": 1}'; done"#;
        let mut r = reward(program, 2.5);
        let requests = vec![serde_json::json!({"prompt": "p"}); 8];
        assert_eq!(r.score(&requests).unwrap(), [1.0; 8]);
    }
}
