//! Loom's example programs as tests run them: the real binaries, built by
//! `cargo build -p loom-core --examples` (which `./scripts/test` runs first).

use std::path::PathBuf;

/// The built example `name` (`bank`, `order_saga`), found beside the running test binary
/// (`target/<profile>/examples/`). Panics with the command that builds it when it is missing.
pub fn example(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("examples").join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "the {name} example is not built: `cargo build -p loom-core --examples` (./scripts/test does)"
            )
        })
}
