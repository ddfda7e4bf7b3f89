//! The plugin SDK this binary was built with, carried inside it: the SDK's
//! and the shared-state crate's sources and the WIT contract, written once
//! under the user's data directory (`$XDG_DATA_HOME/wasmesh/sdk/VERSION-HASH`,
//! else `~/.local/share/…`). `wasmesh plugin new` points new crates there,
//! so that a plugin can be written with an installed `wasmesh` as well as
//! from a clone of the repository, and always against the contract of the
//! `wasmesh` that scaffolded it.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

/// (path under the SDK root, contents).
const FILES: &[(&str, &str)] = &[
    (
        "plugin-sdk/src/bindings.rs",
        include_str!("../plugin-sdk/src/bindings.rs"),
    ),
    (
        "plugin-sdk/src/gate.rs",
        include_str!("../plugin-sdk/src/gate.rs"),
    ),
    (
        "plugin-sdk/src/guest.rs",
        include_str!("../plugin-sdk/src/guest.rs"),
    ),
    (
        "plugin-sdk/src/host.rs",
        include_str!("../plugin-sdk/src/host.rs"),
    ),
    (
        "plugin-sdk/src/lib.rs",
        include_str!("../plugin-sdk/src/lib.rs"),
    ),
    (
        "plugin-sdk/src/native.rs",
        include_str!("../plugin-sdk/src/native.rs"),
    ),
    (
        "plugin-sdk/src/testing.rs",
        include_str!("../plugin-sdk/src/testing.rs"),
    ),
    (
        "plugin-sdk/src/types.rs",
        include_str!("../plugin-sdk/src/types.rs"),
    ),
    (
        "plugin-sdk/src/view.rs",
        include_str!("../plugin-sdk/src/view.rs"),
    ),
    ("state/src/lib.rs", include_str!("../state/src/lib.rs")),
    ("state/src/tests.rs", include_str!("../state/src/tests.rs")),
    ("wit/plugin.wit", include_str!("../wit/plugin.wit")),
];

/// The manifests, rewritten to stand alone (see [`standalone`]).
const MANIFESTS: &[(&str, &str)] = &[
    (
        "plugin-sdk/Cargo.toml",
        include_str!("../plugin-sdk/Cargo.toml"),
    ),
    ("state/Cargo.toml", include_str!("../state/Cargo.toml")),
];

/// The workspace manifest: the dependency versions the SDK was built with.
const WORKSPACE: &str = include_str!("../Cargo.toml");

/// A crate manifest of this workspace made to build outside it: inherited
/// fields and dependencies get the workspace's values, the workspace's lint
/// table is dropped, and the sibling crate is a path dependency.
fn standalone(manifest: &str) -> anyhow::Result<String> {
    let edition = spec("edition", section(WORKSPACE, "[workspace.package]"))?;
    let deps = section(WORKSPACE, "[workspace.dependencies]");
    let mut out = String::new();
    let mut in_lints = false;
    for line in manifest.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            in_lints = t == "[lints]";
        }
        if in_lints {
            continue;
        }
        if t == "edition.workspace = true" {
            out.push_str(&format!("edition = {edition}\n"));
        } else if let Some(name) = t.strip_suffix(".workspace = true") {
            if name == "wasmesh-state" {
                out.push_str("wasmesh-state = { path = \"../state\" }\n");
            } else {
                out.push_str(&format!("{name} = {}\n", spec(name, deps)?));
            }
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

/// The lines of `text` in the TOML table `header`.
fn section<'a>(text: &'a str, header: &str) -> &'a str {
    let Some(start) = text.find(&format!("\n{header}\n")) else {
        return "";
    };
    let body = &text[start + header.len() + 2..];
    let end = body.find("\n[").map_or(body.len(), |e| e + 1);
    &body[..end]
}

/// The value of `name = VALUE` in a table's lines.
fn spec(name: &str, table: &str) -> anyhow::Result<String> {
    table
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
        .with_context(|| format!("the workspace manifest this binary carries has no {name}"))
}

/// Where the SDK goes: `$XDG_DATA_HOME/wasmesh/sdk`, else
/// `$HOME/.local/share/wasmesh/sdk`.
fn base() -> anyhow::Result<PathBuf> {
    let data = match (std::env::var_os("XDG_DATA_HOME"), std::env::var_os("HOME")) {
        (Some(d), _) if !d.is_empty() => PathBuf::from(d),
        (_, Some(h)) if !h.is_empty() => Path::new(&h).join(".local/share"),
        _ => bail!("neither XDG_DATA_HOME nor HOME is set: nowhere to put the plugin SDK"),
    };
    Ok(data.join("wasmesh/sdk"))
}

/// The SDK's directory (the crate new plugins depend on), written if it is
/// not there yet. Its name carries this binary's version and a hash of the
/// contents, so two builds never share a directory they disagree on.
pub fn install() -> anyhow::Result<PathBuf> {
    let mut files: Vec<(String, String)> = FILES
        .iter()
        .map(|(p, c)| (p.to_string(), c.to_string()))
        .collect();
    for (p, m) in MANIFESTS {
        files.push((p.to_string(), standalone(m)?));
    }
    let mut h = Sha256::new();
    for (p, c) in &files {
        h.update(p.as_bytes());
        h.update([0]);
        h.update(c.as_bytes());
        h.update([0]);
    }
    let hash = hex::encode(h.finalize());
    let root = base()?.join(format!("{}-{}", env!("CARGO_PKG_VERSION"), &hash[..12]));
    let sdk = root.join("plugin-sdk");
    if sdk.join("Cargo.toml").exists() {
        return Ok(sdk);
    }
    // Written beside, then renamed into place: a crash or a concurrent
    // `plugin new` never leaves half an SDK under the final name.
    let parent = root.parent().expect("the SDK root has a parent");
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".tmp-{}-{}", std::process::id(), &hash[..12]));
    let _ = std::fs::remove_dir_all(&tmp);
    for (p, c) in &files {
        let f = tmp.join(p);
        std::fs::create_dir_all(f.parent().expect("a file has a directory"))
            .with_context(|| format!("creating {}", tmp.display()))?;
        std::fs::write(&f, c).with_context(|| format!("writing {}", f.display()))?;
    }
    if let Err(e) = std::fs::rename(&tmp, &root) {
        let _ = std::fs::remove_dir_all(&tmp);
        // Another `plugin new` got there first: the same contents.
        if !sdk.join("Cargo.toml").exists() {
            return Err(e).with_context(|| format!("writing the plugin SDK to {}", root.display()));
        }
    }
    Ok(sdk)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_file_of_the_sdk_and_the_state_crate_is_carried() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for dir in ["plugin-sdk/src", "state/src"] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let name = entry.unwrap().file_name();
                let path = format!("{dir}/{}", name.to_string_lossy());
                assert!(
                    FILES.iter().any(|(p, _)| *p == path),
                    "{path} is not in sdk_files::FILES: a scaffolded plugin would not build"
                );
            }
        }
    }

    #[test]
    fn the_manifests_stand_alone() {
        let sdk = standalone(MANIFESTS[0].1).unwrap();
        assert!(!sdk.contains("workspace"), "{sdk}");
        assert!(sdk.contains("edition = \"2024\""), "{sdk}");
        assert!(sdk.contains("wit-bindgen = { version = \"0.61\""), "{sdk}");
        assert!(
            sdk.contains("wasmesh-state = { path = \"../state\" }"),
            "{sdk}"
        );
        assert!(!sdk.contains("[lints]"), "{sdk}");
        let state = standalone(MANIFESTS[1].1).unwrap();
        assert!(!state.contains("workspace"), "{state}");
    }
}
