use std::path::Path;
use std::process::Command;

fn main() {
    // `sqlx::migrate!()` embeds migrations/ at compile time but, on stable Rust, does not tell
    // cargo to watch it: without this, a new migration alone would not rebuild the binaries.
    println!("cargo:rerun-if-changed=migrations");
    // The query macros check against .sqlx/ or, with these set, a live database: either change
    // must expand them again.
    println!("cargo:rerun-if-changed=.sqlx");
    println!("cargo:rerun-if-env-changed=SQLX_OFFLINE");
    println!("cargo:rerun-if-env-changed=SQLX_OFFLINE_DIR");
    println!("cargo:rustc-env=PII_VAULT_COMMIT={}", commit());
}

/// The commit `--version` and `pii_vault_build_info` name: `PII_VAULT_COMMIT` when the build
/// sets it (an image built from a source tarball), else git's short hash, else `unknown`.
fn commit() -> String {
    println!("cargo:rerun-if-env-changed=PII_VAULT_COMMIT");
    if let Ok(commit) = std::env::var("PII_VAULT_COMMIT") {
        if !commit.trim().is_empty() {
            return commit.trim().to_owned();
        }
    }
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|out| out.status.success())
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .map(|text| text.trim().to_owned())
    };
    // Rebuilt when HEAD moves: a checkout changes HEAD, a commit changes the branch's ref,
    // which lives in `packed-refs` instead once git has packed it (`git gc`).
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let common = git(&["rev-parse", "--git-common-dir"]).unwrap_or(git_dir.clone());
        let mut watched = vec![
            Path::new(&git_dir).join("HEAD"),
            Path::new(&common).join("packed-refs"),
        ];
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            watched.push(Path::new(&common).join(branch));
        }
        // A watched path that does not exist makes cargo run this again, and rebuild the
        // crate, on every build.
        for path in watched.iter().filter(|path| path.exists()) {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
}
