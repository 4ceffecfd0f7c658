//! TensorBoard's event files (`[train] report_to = "tensorboard"`), so that `tensorboard
//! --logdir runs/` shows a run's curves as it trains, and `wandb sync --sync-tensorboard`
//! carries them to Weights & Biases: every number `metrics.jsonl` logs is a scalar named
//! `SPLIT/FIELD` (`train/loss`, `val/accuracy`) at its step.
//!
//! The format is small enough to write without TensorFlow or a protobuf library: a file of
//! records, each `u64` length, its masked CRC-32C, the bytes, their masked CRC-32C (all little
//! endian); each record one `Event` message (`wall_time` = 1, `step` = 2, `file_version` = 3,
//! `summary` = 5), a summary holding `Value`s (`tag` = 1, `simple_value` = 2).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

/// The run directory's folder of event files: `tensorboard --logdir runs/pipeline` names each
/// stage's curves `sft/tensorboard`, `ppo/tensorboard`.
pub const DIR: &str = "tensorboard";

/// What every event file opens with; TensorBoard reads a restart's purge only from files
/// of this version.
const FILE_VERSION: &str = "brain.Event:2";

/// One run's event file, appended and flushed as it goes, as `metrics.jsonl` is.
pub struct EventFile {
    path: PathBuf,
    file: File,
}

impl EventFile {
    /// Opens the event file in `run_dir/tensorboard`, made on a run's first call. A resumed
    /// run (`keep_upto`) keeps only the events of steps up to its checkpoint's, as
    /// `metrics.jsonl` keeps its lines, and continues the same file; a record a kill cut short
    /// at the end goes too, else TensorBoard would stop reading there. `logged` is what
    /// `metrics.jsonl` holds by then, `(step, tag, value)`: where the file holds other scalars
    /// (a resume that wrote no event files between, or event files asked for only now), it is
    /// written again from them, so that the two show one curve.
    pub fn open(run_dir: &Path, keep_upto: Option<usize>, logged: &[Scalar]) -> Result<Self> {
        let dir = run_dir.join(DIR);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
        let path = match existing(&dir)? {
            Some(path) => {
                let held = keep_steps_upto(&path, keep_upto.map_or(u64::MAX, |s| s as u64))?;
                if tags(&held) != tags(logged) {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("{}: cannot remove", path.display()))?;
                }
                path
            }
            None => dir.join(new_name()),
        };
        let fresh = !path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let mut events = Self { path, file };
        if fresh {
            let mut body = Vec::new();
            string_field(&mut body, 3, FILE_VERSION.as_bytes());
            events.write(&event(0, &body))?;
            // Stamped now: metrics.jsonl keeps no times.
            let mut at = 0;
            while at < logged.len() {
                let step = logged[at].0;
                let n = logged[at..].iter().take_while(|s| s.0 == step).count();
                let values = logged[at..at + n].iter().map(|s| (s.1.clone(), s.2));
                events.scalars(step as usize, values)?;
                at += n;
            }
        }
        Ok(events)
    }

    /// The numbers of one log line, each as the scalar `tag` at `step`.
    pub fn scalars(
        &mut self,
        step: usize,
        values: impl IntoIterator<Item = (String, f64)>,
    ) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            let mut value = Vec::new();
            string_field(&mut value, 1, tag.as_bytes());
            key(&mut value, 2, WIRE_FIXED32);
            value.extend_from_slice(&(v as f32).to_le_bytes());
            string_field(&mut summary, 1, &value);
        }
        let mut body = Vec::new();
        string_field(&mut body, 5, &summary);
        self.write(&event(step as u64, &body))
    }

    fn write(&mut self, event: &[u8]) -> Result<()> {
        self.file
            .write_all(&record(event))
            .and_then(|()| self.file.flush())
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

/// One scalar: step, tag, value.
pub type Scalar = (u64, String, f64);

/// Trims the event file of a run that writes none now (`report_to` off on a resume) to the
/// steps up to its checkpoint's, as its `metrics.jsonl` is trimmed.
pub fn keep_upto_if_any(run_dir: &Path, upto: usize) -> Result<()> {
    match existing(&run_dir.join(DIR)) {
        Ok(Some(path)) => keep_steps_upto(&path, upto as u64).map(drop),
        _ => Ok(()),
    }
}

/// The `(step, tag)` of each scalar, sorted.
fn tags(s: &[Scalar]) -> Vec<(u64, &str)> {
    let mut t: Vec<(u64, &str)> = s.iter().map(|x| (x.0, x.1.as_str())).collect();
    t.sort_unstable();
    t
}

/// The scalars of one event.
fn event_scalars(event: &[u8]) -> impl Iterator<Item = Scalar> {
    let step = step_of(event);
    summary_values(event)
        .into_iter()
        .map(move |(tag, v)| (step, tag, f64::from(v)))
}

/// The newest event file in `dir`, if any: TensorBoard's names start with the time they
/// were made, so the last in name order.
fn existing(dir: &Path) -> Result<Option<PathBuf>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("events.out.tfevents."))
        })
        .collect();
    names.sort();
    Ok(names.pop())
}

/// `events.out.tfevents.SECONDS.HOST`, as TensorFlow and PyTorch name theirs.
fn new_name() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && !h.contains(['/', '\\']))
        .unwrap_or_else(|| "localhost".into());
    format!("events.out.tfevents.{secs}.{host}")
}

/// Rewrites the event file at `path` with only its whole records whose step is at most
/// `upto` (the file version's, step 0, always); unchanged where that is all of it. Returns the
/// scalars it keeps.
fn keep_steps_upto(path: &Path, upto: u64) -> Result<Vec<Scalar>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (events, whole) = read_records(&bytes);
    let kept: Vec<&[u8]> = events
        .iter()
        .copied()
        .filter(|e| step_of(e) <= upto)
        .collect();
    if kept.len() != events.len() || !whole {
        let text: Vec<u8> = kept.iter().flat_map(|e| record(e)).collect();
        crate::io::write_atomic(path, &text)?;
    }
    Ok(kept.into_iter().flat_map(event_scalars).collect())
}

const WIRE_VARINT: u8 = 0;
const WIRE_FIXED64: u8 = 1;
const WIRE_BYTES: u8 = 2;
const WIRE_FIXED32: u8 = 5;

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn string_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, WIRE_BYTES);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// An `Event` at `step`, stamped now, with `body` (its other fields) after.
fn event(step: u64, body: &[u8]) -> Vec<u8> {
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut out = Vec::with_capacity(body.len() + 20);
    key(&mut out, 1, WIRE_FIXED64);
    out.extend_from_slice(&wall.to_le_bytes());
    key(&mut out, 2, WIRE_VARINT);
    varint(&mut out, step);
    out.extend_from_slice(body);
    out
}

/// One record of the file: `data` framed by its length and the two masked checksums.
fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The records of an event file, and whether they were all of it: reading stops at the first
/// record that is cut short or whose checksums do not match.
fn read_records(bytes: &[u8]) -> (Vec<&[u8]>, bool) {
    let mut out = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let Some(head) = bytes.get(at..at + 12) else {
            return (out, false);
        };
        let (len, len_crc) = head.split_at(8);
        if u32::from_le_bytes(len_crc.try_into().unwrap()) != masked_crc(len) {
            return (out, false);
        }
        let n = u64::from_le_bytes(len.try_into().unwrap());
        let Some(end) = usize::try_from(n)
            .ok()
            .and_then(|n| (at + 12).checked_add(n))
        else {
            return (out, false);
        };
        let (Some(data), Some(crc)) = (bytes.get(at + 12..end), bytes.get(end..end + 4)) else {
            return (out, false);
        };
        if u32::from_le_bytes(crc.try_into().unwrap()) != masked_crc(data) {
            return (out, false);
        }
        out.push(data);
        at = end + 4;
    }
    (out, true)
}

/// An event's `step` (0 where it has none, as protobuf reads a missing field), or `u64::MAX`
/// for a message that does not parse, which a resume drops.
fn step_of(event: &[u8]) -> u64 {
    let mut step = 0;
    let whole = walk(event, |field, wire, _, v| {
        if field == 2 && wire == WIRE_VARINT {
            step = v;
        }
    });
    match whole {
        true => step,
        false => u64::MAX,
    }
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *bytes.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// CRC-32C (Castagnoli), rotated and offset as TFRecord stores it, so that a checksum of
/// bytes holding checksums is not itself trivially zero.
fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut c = i as u32;
            let mut bit = 0;
            while bit < 8 {
                c = if c & 1 != 0 {
                    (c >> 1) ^ 0x82f6_3b78
                } else {
                    c >> 1
                };
                bit += 1;
            }
            table[i] = c;
            i += 1;
        }
        table
    };
    !bytes.iter().fold(!0u32, |c, &b| {
        TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Every scalar of the event files in `run_dir/tensorboard`, as `(step, tag, value)` in file
/// order (tests read back what a run wrote).
pub fn read_scalars(run_dir: &Path) -> Result<Vec<(u64, String, f32)>> {
    let dir = run_dir.join(DIR);
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{}: cannot read directory", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    for path in files {
        let bytes = std::fs::read(&path)?;
        let (events, whole) = read_records(&bytes);
        anyhow::ensure!(
            whole,
            "{}: a record is cut short or garbled",
            path.display()
        );
        let scalars = events.into_iter().flat_map(event_scalars);
        out.extend(scalars.map(|(step, tag, v)| (step, tag, v as f32)));
    }
    Ok(out)
}

/// The `(tag, simple_value)` pairs of an event's summary.
fn summary_values(event: &[u8]) -> Vec<(String, f32)> {
    let mut out = Vec::new();
    for (field, summary) in bytes_fields(event) {
        if field != 5 {
            continue;
        }
        for (f, value) in bytes_fields(summary) {
            if f != 1 {
                continue;
            }
            let tag = bytes_fields(value)
                .into_iter()
                .find(|(f, _)| *f == 1)
                .map(|(_, t)| String::from_utf8_lossy(t).into_owned());
            let simple = fixed32_field(value, 2).map(f32::from_bits);
            if let (Some(tag), Some(v)) = (tag, simple) {
                out.push((tag, v));
            }
        }
    }
    out
}

/// A message's length-delimited fields, `(number, bytes)`, stopping where it does not parse.
fn bytes_fields(msg: &[u8]) -> Vec<(u64, &[u8])> {
    let mut out = Vec::new();
    walk(msg, |field, wire, bytes, _| {
        if wire == WIRE_BYTES {
            out.push((field, bytes));
        }
    });
    out
}

fn fixed32_field(msg: &[u8], number: u64) -> Option<u32> {
    let mut found = None;
    walk(msg, |field, wire, bytes, _| {
        if field == number && wire == WIRE_FIXED32 {
            found = bytes.try_into().ok().map(u32::from_le_bytes);
        }
    });
    found
}

/// Calls `f(field, wire type, payload, varint)` for each field of a message (a varint's
/// payload is empty and its value the fourth argument, 0 for the other types), stopping where
/// it does not parse; whether it read the whole message.
fn walk<'a>(msg: &'a [u8], mut f: impl FnMut(u64, u8, &'a [u8], u64)) -> bool {
    let mut at = 0;
    while at < msg.len() {
        let Some(k) = read_varint(msg, &mut at) else {
            return false;
        };
        let (field, wire) = (k >> 3, (k & 7) as u8);
        let (len, value) = match wire {
            WIRE_VARINT => match read_varint(msg, &mut at) {
                Some(v) => (0, v),
                None => return false,
            },
            WIRE_FIXED64 => (8, 0),
            WIRE_FIXED32 => (4, 0),
            WIRE_BYTES => match read_varint(msg, &mut at) {
                Some(n) => (n as usize, 0),
                None => return false,
            },
            _ => return false,
        };
        let Some(payload) = at.checked_add(len).and_then(|end| msg.get(at..end)) else {
            return false;
        };
        f(field, wire, payload, value);
        at += len;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check value every CRC-32C implementation is held to (RFC 3720's polynomial).
    #[test]
    fn crc32c_gives_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c(b""), 0);
        // RFC 3720 B.4: 32 bytes of zeros.
        assert_eq!(crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c(&[0xffu8; 32]), 0x62a8_ab43);
    }

    #[test]
    fn records_read_back_and_a_cut_tail_is_found() {
        let a = event(3, b"");
        let b = event(7, b"");
        let mut bytes = record(&a);
        bytes.extend(record(&b));
        let (events, whole) = read_records(&bytes);
        assert!(whole);
        assert_eq!(
            events.iter().map(|e| step_of(e)).collect::<Vec<_>>(),
            [3, 7]
        );
        for cut in 1..record(&b).len() {
            let (events, whole) = read_records(&bytes[..bytes.len() - cut]);
            assert!(!whole, "cut by {cut}");
            assert_eq!(events.len(), 1);
        }
        let mut flipped = bytes.clone();
        let n = flipped.len();
        flipped[n - 6] ^= 1;
        assert_eq!(read_records(&flipped), (vec![&a[..]], false));
    }

    #[test]
    fn a_resume_keeps_the_steps_up_to_its_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut ev = EventFile::open(dir.path(), None, &[]).unwrap();
        for s in 1..=6 {
            ev.scalars(s, [("train/loss".to_string(), s as f64 / 2.0)])
                .unwrap();
        }
        ev.scalars(6, [("val/accuracy".to_string(), f64::NAN)])
            .unwrap();
        drop(ev);
        let read = read_scalars(dir.path()).unwrap();
        assert_eq!(read.len(), 7);
        assert_eq!(read[2], (3, "train/loss".to_string(), 1.5));
        assert!(read[6].2.is_nan());
        // A kill cut the last record short: the resume drops it with the steps after 4.
        let path = existing(&dir.path().join(DIR)).unwrap().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let logged: Vec<Scalar> = (1..=4u64)
            .map(|s| (s, "train/loss".to_string(), s as f64 / 2.0))
            .collect();
        let mut ev = EventFile::open(dir.path(), Some(4), &logged).unwrap();
        ev.scalars(5, [("train/loss".to_string(), 9.0)]).unwrap();
        let read = read_scalars(dir.path()).unwrap();
        let steps: Vec<u64> = read.iter().map(|r| r.0).collect();
        assert_eq!(steps, [1, 2, 3, 4, 5]);
        assert_eq!(read[4].2, 9.0);
        // A file that holds other steps than metrics.jsonl (a resume that wrote none between)
        // is written again from metrics.jsonl.
        drop(ev);
        let mut logged = logged;
        logged.push((5, "train/loss".to_string(), 9.0));
        logged.push((6, "train/loss".to_string(), 7.0));
        let ev = EventFile::open(dir.path(), Some(6), &logged).unwrap();
        drop(ev);
        let read = read_scalars(dir.path()).unwrap();
        let steps: Vec<u64> = read.iter().map(|r| r.0).collect();
        assert_eq!(steps, [1, 2, 3, 4, 5, 6]);
        assert_eq!(read[5].2, 7.0);
        // One file, opening with its version.
        let path = existing(&dir.path().join(DIR)).unwrap().unwrap();
        let files = std::fs::read_dir(dir.path().join(DIR)).unwrap().count();
        assert_eq!(files, 1);
        let bytes = std::fs::read(&path).unwrap();
        let (events, _) = read_records(&bytes);
        assert_eq!(
            bytes_fields(events[0]),
            [(3, FILE_VERSION.as_bytes())],
            "the first event is the file version"
        );
    }

    /// Field numbers and wire types as TensorBoard's `event.proto` and `summary.proto` give
    /// them, spelled out byte by byte for one scalar.
    #[test]
    fn a_scalar_event_is_encoded_as_the_protos_say() {
        let mut summary = Vec::new();
        let mut value = Vec::new();
        string_field(&mut value, 1, b"a/b");
        key(&mut value, 2, WIRE_FIXED32);
        value.extend_from_slice(&1.5f32.to_le_bytes());
        string_field(&mut summary, 1, &value);
        assert_eq!(
            summary,
            [0x0a, 0x0a, 0x0a, 0x03, b'a', b'/', b'b', 0x15, 0x00, 0x00, 0xc0, 0x3f]
        );
        let e = event(300, &[]);
        assert_eq!(e[0], 0x09, "wall_time: field 1, fixed64");
        assert_eq!(&e[9..], [0x10, 0xac, 0x02], "step 300: field 2, varint");
    }
}
