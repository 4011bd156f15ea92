use std::path::Path;
use std::process::Command;

fn main() {
    // `sqlx::migrate!()` embeds migrations/ at compile time but, on stable Rust, does not tell
    // cargo to watch it: without this, a new migration alone would not rebuild the binaries.
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rustc-env=PII_VAULT_COMMIT={}", commit());
}

/// The commit `--version` and `pii_vault_build_info` name: `PII_VAULT_COMMIT` when the build
/// sets it (an image built from a source tarball), else git's short hash, else `unknown`.
fn commit() -> String {
    println!("cargo:rerun-if-env-changed=PII_VAULT_COMMIT");
    if let Ok(commit) = std::env::var("PII_VAULT_COMMIT") {
        return commit;
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
    // Rebuilt when HEAD moves: a checkout changes HEAD, a commit changes the branch's ref.
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let head = Path::new(&git_dir).join("HEAD");
        println!("cargo:rerun-if-changed={}", head.display());
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            let common = git(&["rev-parse", "--git-common-dir"]).unwrap_or(git_dir);
            println!(
                "cargo:rerun-if-changed={}",
                Path::new(&common).join(branch).display()
            );
        }
    }
    git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
}
