//! Where the operator's image keeps its two programs (the `Dockerfile`, the image the test cluster
//! builds, the chart's `command` and the init container of every unit agree on these), and where a
//! unit's pod puts the stage runtime for its own image.

/// The operator, and the `switchyard` command.
pub const OPERATOR_PROGRAM: &str = "/switchyard";
/// The runtime every unit runs.
pub const STAGE_PROGRAM: &str = "/switchyard-stage";
/// The folder the init container copies `switchyard-stage` into, and the stage container runs it
/// from. It must not be, or be under, a path the image already has as a file: the image keeps its
/// programs at the root, so a folder named `/switchyard/…` cannot be mounted there.
pub const RUNTIME_DIR: &str = "/opt/switchyard/bin";

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_runtime_folder_can_be_mounted_in_the_operators_own_image() {
        for program in [OPERATOR_PROGRAM, STAGE_PROGRAM] {
            // A mount point under a file fails with "not a directory" in runc.
            assert!(
                !Path::new(RUNTIME_DIR).starts_with(program),
                "{RUNTIME_DIR} is under {program}, a file of the image"
            );
            assert_ne!(Path::new(RUNTIME_DIR), Path::new(program));
        }
    }

    #[test]
    fn the_dockerfile_puts_the_programs_where_the_plan_runs_them() {
        let dockerfile = include_str!("../../Dockerfile");
        for program in [OPERATOR_PROGRAM, STAGE_PROGRAM] {
            let name = program.trim_start_matches('/');
            assert!(
                dockerfile
                    .lines()
                    .any(|l| l.starts_with("COPY") && l.ends_with(&format!("/{name} {program}"))),
                "the Dockerfile does not copy {name} to {program}"
            );
        }
        assert!(dockerfile.contains(&format!("ENTRYPOINT [\"{OPERATOR_PROGRAM}\"]")));
    }
}
