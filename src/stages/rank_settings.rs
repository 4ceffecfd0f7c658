//! Every rank of a job runs the settings rank 0 runs. `temper launch` hands each rank the
//! same command, but torchrun, srun and `--nnodes` users type one per node, and ranks of
//! another seed, learning rate or batch would train together without a word (each from its
//! own initial weights: nothing copies rank 0's).

use std::path::PathBuf;

use anyhow::{bail, Result};

use crate::config::RunConfig;
use crate::dist::{bytes::broadcast_from, Communicator};

/// Checks `cfg` against rank 0's on every rank: a rank whose settings differ names the first
/// key that does, and every rank stops. Collective: every rank makes the same two calls
/// whatever fails on it, so none is left waiting. Input paths are left out: a Hub name
/// resolves to each node's own cache, and a node may mount the data elsewhere.
pub fn check_same_settings(cfg: &RunConfig, comm: &dyn Communicator) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let mut compared = cfg.clone();
    for (path, ..) in compared.input_paths() {
        *path = PathBuf::new();
    }
    let mine = toml::Value::try_from(&compared).and_then(|v| Ok((toml::to_string(&v)?, v)));
    let text = mine.as_ref().map_or("", |(t, _)| t.as_str());
    let theirs = broadcast_from(comm, 0, text.as_bytes())?;
    let difference = match &mine {
        Err(e) => Some(format!("its settings do not serialise ({e})")),
        Ok(_) if theirs == text.as_bytes() => None,
        Ok((_, mine)) => Some(
            match toml::from_str::<toml::Value>(&String::from_utf8_lossy(&theirs)) {
                Ok(theirs) => match first_difference(mine, &theirs, "") {
                    Some((key, here, there)) => {
                        format!("{key} is {here} here and {there} on rank 0")
                    }
                    None => "they are written differently".into(),
                },
                Err(e) => format!("rank 0's do not read back ({e})"),
            },
        ),
    };
    let mut differ = [f32::from(u8::from(difference.is_some()))];
    comm.all_reduce_mean(&mut differ)?;
    if let Some(what) = difference {
        bail!(
            "rank {}'s settings differ from rank 0's: {what}; every rank must run the same \
             command",
            comm.rank()
        );
    }
    if differ[0] > 0.0 {
        bail!(
            "another rank's settings differ from this one's (that rank says how); every rank \
             must run the same command"
        );
    }
    Ok(())
}

/// The first key (dotted) whose value differs between `a` and `b`, with the two values; none
/// where they are the same.
fn first_difference(
    a: &toml::Value,
    b: &toml::Value,
    at: &str,
) -> Option<(String, String, String)> {
    let shown = |v: Option<&toml::Value>| v.map_or("unset".into(), ToString::to_string);
    match (a, b) {
        (toml::Value::Table(x), toml::Value::Table(y)) => {
            let keys = x.keys().chain(y.keys().filter(|k| !x.contains_key(*k)));
            keys.into_iter().find_map(|k| {
                let key = match at {
                    "" => k.clone(),
                    _ => format!("{at}.{k}"),
                };
                match (x.get(k), y.get(k)) {
                    (Some(p), Some(q)) => first_difference(p, q, &key),
                    (p, q) => Some((key, shown(p), shown(q))),
                }
            })
        }
        _ => (a != b).then(|| (at.to_string(), shown(Some(a)), shown(Some(b)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::ThreadGroup;

    #[test]
    fn the_first_differing_key_is_named() {
        let a: toml::Value = toml::from_str("[train]\nseed = 1\nlr = 0.1\n[sft]\nx = 2\n").unwrap();
        let b: toml::Value = toml::from_str("[train]\nseed = 1\nlr = 0.2\n[sft]\nx = 2\n").unwrap();
        assert_eq!(
            first_difference(&a, &b, ""),
            Some(("train.lr".into(), "0.1".into(), "0.2".into()))
        );
        assert_eq!(first_difference(&a, &a, ""), None);
        let c: toml::Value = toml::from_str("[train]\nseed = 1\nlr = 0.1\n").unwrap();
        assert_eq!(
            first_difference(&c, &a, ""),
            Some(("sft".into(), "unset".into(), "{ x = 2 }".into()))
        );
    }

    /// Ranks of one setting pass; a rank of another seed names it, and every rank stops.
    #[test]
    fn ranks_of_other_settings_stop_every_rank() {
        let base = RunConfig::default();
        let mut other = base.clone();
        other.train.seed += 1;
        let run = |cfgs: [&RunConfig; 3]| -> Vec<Result<()>> {
            let group = ThreadGroup::new(3);
            std::thread::scope(|s| {
                let hs: Vec<_> = group
                    .iter()
                    .map(|c| s.spawn(move || check_same_settings(cfgs[c.rank()], c)))
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            })
        };
        assert!(run([&base, &base, &base]).iter().all(Result::is_ok));
        let got = run([&base, &other, &base]);
        let e: Vec<String> = got
            .iter()
            .map(|r| r.as_ref().unwrap_err().to_string())
            .collect();
        assert!(
            e[1].starts_with("rank 1's settings differ from rank 0's: train.seed is"),
            "{e:?}"
        );
        assert!(e[0].contains("another rank's settings differ"), "{e:?}");
        assert!(e[2].contains("another rank's settings differ"), "{e:?}");
        // Input paths may differ (a Hub name resolves to each node's own cache).
        let mut elsewhere = base.clone();
        elsewhere.init = Some("/node1/hub/snapshots/abc".into());
        let mut here = base.clone();
        here.init = Some("/node0/hub/snapshots/abc".into());
        assert!(run([&here, &elsewhere, &here]).iter().all(Result::is_ok));
    }
}
