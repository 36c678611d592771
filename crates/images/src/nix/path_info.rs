use serde_json::Value;

use super::{NarHash, ParseError, StoreDir, StorePath};

/// One store path's entry in `nix path-info --json`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathInfo {
    pub path: StorePath,
    pub nar_hash: NarHash,
    pub nar_size: u64,
    pub references: Vec<StorePath>,
    pub deriver: Option<StorePath>,
    pub signatures: Vec<String>,
}

fn bad(msg: impl Into<String>) -> ParseError {
    ParseError::PathInfo(msg.into())
}

/// A store path given absolute (`/nix/store/...`, older Nix) or as a base name (newer Nix).
fn store_path(s: &str, store_dir: &StoreDir) -> Result<StorePath, ParseError> {
    if s.starts_with('/') {
        StorePath::from_absolute(s, store_dir)
    } else {
        StorePath::from_base_name(s)
    }
}

fn entry(path: &str, v: &Value, store_dir: &StoreDir) -> Result<PathInfo, ParseError> {
    let obj = match v {
        Value::Object(o) => o,
        Value::Null => return Err(bad(format!("{path} is not valid in the store"))),
        _ => return Err(bad(format!("{path}: entry is not an object"))),
    };
    if obj.get("valid").and_then(Value::as_bool) == Some(false) {
        return Err(bad(format!("{path} is not valid in the store")));
    }
    let path = store_path(path, store_dir)?;
    let nar_hash = obj
        .get("narHash")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(format!("{path}: no narHash")))
        .and_then(NarHash::parse)?;
    let nar_size = obj
        .get("narSize")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad(format!("{path}: no narSize")))?;
    let references = match obj.get("references") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(refs)) => refs
            .iter()
            .map(|r| {
                r.as_str()
                    .ok_or_else(|| bad(format!("{path}: reference is not a string")))
                    .and_then(|r| store_path(r, store_dir))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad(format!("{path}: references is not an array"))),
    };
    let deriver = match obj.get("deriver") {
        None | Some(Value::Null) => None,
        Some(Value::String(d)) => Some(store_path(d, store_dir)?),
        Some(_) => return Err(bad(format!("{path}: deriver is not a string"))),
    };
    let signatures = match obj.get("signatures") {
        Some(Value::Array(sigs)) => sigs
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    Ok(PathInfo {
        path,
        nar_hash,
        nar_size,
        references,
        deriver,
        signatures,
    })
}

/// Parses `nix path-info --json [--recursive]` output. Nix 2.8 prints an array of objects
/// with a `path` field (absolute paths, `narHash` in SRI form); newer Nix prints an object
/// keyed by path whose values lack `path` (and may use base names). Both are accepted;
/// an invalid (not present) path is an error. Array order is kept; object entries come
/// sorted by key.
pub fn parse_path_info_json(json: &str, store_dir: &StoreDir) -> Result<Vec<PathInfo>, ParseError> {
    let v: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    match &v {
        Value::Array(items) => items
            .iter()
            .map(|item| {
                let path = item
                    .get("path")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("array entry without `path`"))?;
                entry(path, item, store_dir)
            })
            .collect(),
        Value::Object(map) => map
            .iter()
            .map(|(path, item)| entry(path, item, store_dir))
            .collect(),
        _ => Err(bad("neither an array nor an object")),
    }
}
