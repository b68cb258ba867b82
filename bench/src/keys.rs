//! Real RSA endpoint keys, generated once and cached on disk: generating a few hundred
//! 2048-bit keys takes longer than a benchmark run should wait.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use letro_server::client::Endpoint;
use letro_server::domain::EndpointId;

/// An endpoint's public half: all a pairing request needs.
#[derive(Debug, Clone)]
pub(crate) struct BenchKey {
    /// The endpoint id.
    pub(crate) id: EndpointId,
    /// The identity key, SubjectPublicKeyInfo DER, base64.
    pub spki_b64: String,
}

/// Loads `count` keys from `path` (one base64 SPKI per line), generating and appending
/// what is missing.
pub(crate) fn load_or_generate(path: &Path, count: usize) -> anyhow::Result<Vec<BenchKey>> {
    let mut lines: Vec<String> = match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    };
    if lines.len() < count {
        eprintln!(
            "generating {} RSA-2048 endpoint keys (cached in {})",
            count - lines.len(),
            path.display()
        );
        while lines.len() < count {
            let endpoint = Endpoint::generate(2048)?;
            lines.push(STANDARD.encode(endpoint.spki_der()));
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, lines.join("\n") + "\n")?;
    }
    lines
        .iter()
        .take(count)
        .map(|line| {
            let der = STANDARD.decode(line)?;
            Ok(BenchKey {
                id: EndpointId::from_spki_der(&der),
                spki_b64: line.clone(),
            })
        })
        .collect()
}
