//! Routing strategies per pool: fetching and pinning wasm modules, keeping
//! them content-addressed on disk (Envoy loads them from there), and the
//! history that rollback walks back. The state is persisted so that a
//! restarted control plane serves the same strategies as before.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{PoolSpec, StrategySpec};

/// Largest module accepted.
pub const MAX_MODULE_BYTES: usize = 64 << 20;
const STATE_FILE: &str = "strategies.json";
/// Rollback depth kept per pool.
const HISTORY: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum StrategyError {
    #[error("reading module {0}: {1}")]
    Read(String, std::io::Error),
    #[error("fetching module {0}: {1}")]
    Fetch(String, String),
    #[error("module {module} has sha256 {actual}, expected {expected}")]
    Sha256Mismatch {
        module: String,
        expected: String,
        actual: String,
    },
    #[error("module {0} is not a wasm binary")]
    NotWasm(String),
    #[error("module {0} is larger than {MAX_MODULE_BYTES} bytes")]
    TooLarge(String),
    #[error("invalid strategy: {0}")]
    Invalid(String),
    #[error("storing module: {0}")]
    Store(std::io::Error),
    #[error("unknown pool {0}")]
    UnknownPool(String),
    #[error("pool {0} has no earlier strategy to roll back to")]
    NoHistory(String),
}

/// A strategy whose module was fetched, verified and stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Active {
    pub spec: StrategySpec,
    pub sha256: String,
    /// The content-addressed copy Envoy loads.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PoolStrategies {
    current: Option<Active>,
    history: Vec<Active>,
    /// For a pool from Kubernetes: the strategy its resource asked for when last applied
    /// (a change there replaces `current`; a change through the admin API lasts until then).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    source: Option<StrategySpec>,
}

impl PoolStrategies {
    /// Makes `active` current; the one it replaces goes to the (bounded) history and is
    /// returned.
    fn replace(&mut self, active: Option<Active>) -> Option<Active> {
        let previous = std::mem::replace(&mut self.current, active);
        if let Some(prev) = previous.clone() {
            self.history.push(prev);
            if self.history.len() > HISTORY {
                self.history.remove(0);
            }
        }
        previous
    }
}

/// Strategies of every pool.
#[derive(Debug)]
pub struct Strategies {
    store: PathBuf,
    pools: BTreeMap<String, PoolStrategies>,
    /// Bumped on every change.
    pub generation: u64,
}

async fn fetch(module: &str) -> Result<Vec<u8>, StrategyError> {
    let bytes = if module.starts_with("http://") || module.starts_with("https://") {
        let resp = reqwest::get(module)
            .await
            .map_err(|e| StrategyError::Fetch(module.into(), e.to_string()))?;
        if !resp.status().is_success() {
            return Err(StrategyError::Fetch(
                module.into(),
                format!("HTTP {}", resp.status()),
            ));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_MODULE_BYTES as u64)
        {
            return Err(StrategyError::TooLarge(module.into()));
        }
        resp.bytes()
            .await
            .map_err(|e| StrategyError::Fetch(module.into(), e.to_string()))?
            .to_vec()
    } else {
        let meta = tokio::fs::metadata(module)
            .await
            .map_err(|e| StrategyError::Read(module.into(), e))?;
        if meta.len() > MAX_MODULE_BYTES as u64 {
            return Err(StrategyError::TooLarge(module.into()));
        }
        tokio::fs::read(module)
            .await
            .map_err(|e| StrategyError::Read(module.into(), e))?
    };
    if bytes.len() > MAX_MODULE_BYTES {
        return Err(StrategyError::TooLarge(module.into()));
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(StrategyError::NotWasm(module.into()));
    }
    Ok(bytes)
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl Strategies {
    /// Loads the persisted state from `store`, if any; pools without one get
    /// the strategy of the config file.
    pub async fn open(store: &Path, pools: &[PoolSpec]) -> Result<Self, StrategyError> {
        tokio::fs::create_dir_all(store)
            .await
            .map_err(StrategyError::Store)?;
        let persisted: BTreeMap<String, PoolStrategies> =
            match tokio::fs::read(store.join(STATE_FILE)).await {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "ignoring unreadable persisted strategies");
                    BTreeMap::new()
                }),
                Err(_) => BTreeMap::new(),
            };
        let mut s = Self {
            store: store.to_owned(),
            pools: BTreeMap::new(),
            generation: 1,
        };
        for pool in pools {
            let kept = persisted
                .get(&pool.name)
                .filter(|p| p.current.as_ref().is_some_and(|a| a.path.exists()));
            let entry = match (kept, &pool.strategy) {
                (Some(p), _) => p.clone(),
                (None, Some(spec)) => PoolStrategies {
                    current: Some(s.prepare(spec).await?),
                    ..Default::default()
                },
                (None, None) => PoolStrategies::default(),
            };
            s.pools.insert(pool.name.clone(), entry);
        }
        // Pools from Kubernetes keep what they had (a strategy set through the admin API
        // included) until their resource says otherwise; `sync_dynamic` drops those gone.
        for (name, p) in persisted {
            if p.source.is_some()
                && !s.pools.contains_key(&name)
                && p.current.as_ref().is_none_or(|a| a.path.exists())
            {
                s.pools.insert(name, p);
            }
        }
        s.persist().await;
        Ok(s)
    }

    /// Fetches, verifies and stores a strategy's module.
    pub async fn prepare(&self, spec: &StrategySpec) -> Result<Active, StrategyError> {
        spec.check().map_err(StrategyError::Invalid)?;
        let bytes = fetch(&spec.module).await?;
        let actual = sha256_hex(&bytes);
        if let Some(expected) = &spec.sha256
            && !expected.eq_ignore_ascii_case(&actual)
        {
            return Err(StrategyError::Sha256Mismatch {
                module: spec.module.clone(),
                expected: expected.clone(),
                actual,
            });
        }
        let path = self.store.join(format!("{actual}.wasm"));
        if !path.exists() {
            let tmp = self.store.join(format!(".{actual}.tmp"));
            tokio::fs::write(&tmp, &bytes)
                .await
                .map_err(StrategyError::Store)?;
            tokio::fs::rename(&tmp, &path)
                .await
                .map_err(StrategyError::Store)?;
        }
        Ok(Active {
            spec: spec.clone(),
            sha256: actual,
            path,
        })
    }

    async fn persist(&self) {
        let Ok(json) = serde_json::to_vec_pretty(&self.pools) else {
            return;
        };
        let tmp = self.store.join(format!(".{STATE_FILE}.tmp"));
        let result = async {
            tokio::fs::write(&tmp, &json).await?;
            tokio::fs::rename(&tmp, self.store.join(STATE_FILE)).await
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not persist strategies");
        }
    }

    pub fn current(&self, pool: &str) -> Option<&Active> {
        self.pools.get(pool).and_then(|p| p.current.as_ref())
    }

    pub fn history_len(&self, pool: &str) -> usize {
        self.pools.get(pool).map_or(0, |p| p.history.len())
    }

    /// Makes `active` the pool's strategy; the previous one goes to history.
    /// Returns what was current before (to restore it on a NACK).
    pub async fn set(
        &mut self,
        pool: &str,
        active: Active,
    ) -> Result<Option<Active>, StrategyError> {
        let p = self
            .pools
            .get_mut(pool)
            .ok_or_else(|| StrategyError::UnknownPool(pool.into()))?;
        let previous = p.replace(Some(active));
        self.generation += 1;
        self.persist().await;
        Ok(previous)
    }

    /// Undoes a [`set`](Self::set) that Envoy refused: the refused strategy
    /// leaves no trace in the history.
    pub async fn revert(&mut self, pool: &str, previous: Option<Active>) {
        if let Some(p) = self.pools.get_mut(pool) {
            if previous.is_some() {
                p.history.pop();
            }
            p.current = previous;
            self.generation += 1;
            self.persist().await;
        }
    }

    /// Follows the pools from Kubernetes (`dynamic`; the file's pools are left alone): a new
    /// pool gets its resource's strategy, a pool whose resource asks for another strategy
    /// gets it (the old one goes to history), a pool gone is forgotten. A module that cannot
    /// be fetched leaves that pool on what it had (none for a new pool: Envoy's own
    /// balancing), with a warning; the next change of that resource tries again.
    pub async fn sync_dynamic(&mut self, dynamic: &[PoolSpec], is_static: impl Fn(&str) -> bool) {
        let before = self.generation;
        let wanted: BTreeMap<&str, &PoolSpec> =
            dynamic.iter().map(|p| (p.name.as_str(), p)).collect();
        let gone: Vec<String> = self
            .pools
            .keys()
            .filter(|name| !is_static(name) && !wanted.contains_key(name.as_str()))
            .cloned()
            .collect();
        for name in gone {
            self.pools.remove(&name);
            self.generation += 1;
        }
        for (name, pool) in wanted {
            let entry = self.pools.get(name);
            if entry.is_some_and(|e| e.source == pool.strategy) {
                continue;
            }
            let active = match &pool.strategy {
                None => None,
                Some(spec) => match self.prepare(spec).await {
                    Ok(a) => Some(a),
                    Err(e) => {
                        tracing::warn!(pool = name, error = %e, "strategy of the resource not loaded");
                        // Mark it applied so an unchanged resource is not retried every sync.
                        let e = self.pools.entry(name.to_owned()).or_default();
                        e.source = pool.strategy.clone();
                        continue;
                    }
                },
            };
            let e = self.pools.entry(name.to_owned()).or_default();
            e.source = pool.strategy.clone();
            if e.current != active {
                e.replace(active);
            }
            self.generation += 1;
        }
        if self.generation != before {
            self.persist().await;
        }
    }

    /// Goes back to the previous strategy. Returns (rolled back from, to).
    pub async fn rollback(
        &mut self,
        pool: &str,
    ) -> Result<(Option<Active>, Active), StrategyError> {
        let p = self
            .pools
            .get_mut(pool)
            .ok_or_else(|| StrategyError::UnknownPool(pool.into()))?;
        let prev = p
            .history
            .pop()
            .ok_or_else(|| StrategyError::NoHistory(pool.into()))?;
        let from = p.current.replace(prev.clone());
        self.generation += 1;
        self.persist().await;
        Ok((from, prev))
    }

    /// Re-applies a strategy popped by rollback that Envoy refused.
    pub async fn undo_rollback(&mut self, pool: &str, from: Option<Active>, to: Active) {
        if let Some(p) = self.pools.get_mut(pool) {
            p.current = from;
            p.history.push(to);
            self.generation += 1;
            self.persist().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(module: &Path, sha: Option<String>) -> StrategySpec {
        StrategySpec {
            name: "rr".into(),
            module: module.to_string_lossy().into_owned(),
            sha256: sha,
            params: serde_json::json!({}),
        }
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvmesh-strategy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[tokio::test]
    async fn pins_by_sha_stores_by_content_and_rolls_back() {
        let dir = tempdir("pin");
        let a = dir.join("a.wasm");
        let b = dir.join("b.wasm");
        std::fs::write(&a, b"\0asm\x01\0\0\0a").expect("write");
        std::fs::write(&b, b"\0asm\x01\0\0\0b").expect("write");
        let not_wasm = dir.join("c.txt");
        std::fs::write(&not_wasm, b"hello").expect("write");
        let mut s = Strategies::open(&dir.join("store"), &[])
            .await
            .expect("open");
        s.pools.insert("p".into(), PoolStrategies::default());

        let good = sha256_hex(&std::fs::read(&a).expect("read"));
        let active = s
            .prepare(&spec(&a, Some(good.clone())))
            .await
            .expect("pinned");
        assert_eq!(active.path, dir.join("store").join(format!("{good}.wasm")));
        let wrong = "0".repeat(64);
        assert!(matches!(
            s.prepare(&spec(&a, Some(wrong))).await,
            Err(StrategyError::Sha256Mismatch { .. })
        ));
        assert!(matches!(
            s.prepare(&spec(&not_wasm, None)).await,
            Err(StrategyError::NotWasm(_))
        ));

        s.set("p", active.clone()).await.expect("set a");
        let second = s.prepare(&spec(&b, None)).await.expect("b");
        let prev = s.set("p", second.clone()).await.expect("set b");
        assert_eq!(prev.as_ref(), Some(&active));
        // A NACKed push is reverted without leaving history behind.
        s.revert("p", prev).await;
        assert_eq!(s.current("p"), Some(&active));
        assert_eq!(s.history_len("p"), 0);
        s.set("p", second.clone()).await.expect("set b again");
        let (from, to) = s.rollback("p").await.expect("rollback");
        assert_eq!((from.as_ref(), &to), (Some(&second), &active));
        assert!(matches!(
            s.rollback("p").await,
            Err(StrategyError::NoHistory(_))
        ));

        // Persisted: a restart serves the same strategy.
        let pools = vec![
            serde_yaml::from_str::<PoolSpec>("{name: p, model: m, listener: '127.0.0.1:1'}")
                .expect("pool"),
        ];
        let reopened = Strategies::open(&dir.join("store"), &pools)
            .await
            .expect("reopen");
        assert_eq!(reopened.current("p"), Some(&active));
    }
}
