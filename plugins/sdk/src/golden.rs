//! The committed golden vectors of prompt identity: request JSON in, canonical
//! length and chunk-hash chain out (`golden/requests.json`,
//! `golden/expected.json`). Every crate that computes chunk hashes checks
//! itself against them with [`vectors`].

use serde::{Deserialize, Serialize};

/// One request of the corpus.
#[derive(Debug, Clone, Deserialize)]
pub struct GoldenRequest {
    /// Case name.
    pub name: String,
    /// Request path (selects the API).
    pub path: String,
    /// Chunk size for this case.
    pub chunk_bytes: u32,
    /// The request body.
    pub body: serde_json::Value,
}

/// What the contract says about one request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoldenExpected {
    /// Case name.
    pub name: String,
    /// `Ok`: per prompt, its canonical byte length and hash chain (hex).
    /// `Err`: the error label ([`crate::prompt::PromptError::label`]).
    pub result: Result<Vec<GoldenPrompt>, String>,
}

/// One prompt's identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GoldenPrompt {
    /// Canonical bytes, as a string (they are UTF-8 for every case).
    pub canonical: String,
    /// Chunk hashes, `{:016x}`.
    pub hashes: Vec<String>,
}

/// The committed corpus and expectations, paired by name.
pub fn vectors() -> Vec<(GoldenRequest, GoldenExpected)> {
    let requests: Vec<GoldenRequest> =
        serde_json::from_str(include_str!("../golden/requests.json")).unwrap_or_default();
    let expected: Vec<GoldenExpected> =
        serde_json::from_str(include_str!("../golden/expected.json")).unwrap_or_default();
    assert_eq!(requests.len(), expected.len(), "golden files out of step");
    requests.into_iter().zip(expected).collect()
}

/// Computes a case with this crate's implementation.
pub fn compute(req: &GoldenRequest) -> GoldenExpected {
    let result = crate::prompt::Api::from_path(&req.path)
        .ok_or_else(|| "unknown_path".to_owned())
        .and_then(|api| {
            let body = serde_json::to_vec(&req.body).map_err(|e| e.to_string())?;
            crate::prompt::parse(api, &body).map_err(|e| e.label().to_owned())
        })
        .map(|p| {
            p.canonical
                .iter()
                .map(|c| GoldenPrompt {
                    canonical: String::from_utf8_lossy(c).into_owned(),
                    hashes: crate::chunk::chunk_hashes(&p.model, c, req.chunk_bytes)
                        .iter()
                        .map(|h| format!("{h:016x}"))
                        .collect(),
                })
                .collect()
        });
    GoldenExpected {
        name: req.name.clone(),
        result,
    }
}
