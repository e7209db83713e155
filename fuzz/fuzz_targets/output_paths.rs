//! Output-path validation in kiln-worker (`output_collector::check_paths`): a Command whose
//! paths are accepted names only places strictly inside the action root.
#![no_main]
#![allow(deprecated)] // output_files and output_directories: REAPI 2.0, still sent.

use std::path::Path;

use arbitrary::Arbitrary;
use kiln_fuzz::assert_beneath;
use kiln_proto::reapi::Command;
use kiln_worker::fuzzing::{check_paths, output_location};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    working_directory: String,
    output_files: Vec<String>,
    output_directories: Vec<String>,
    output_paths: Vec<String>,
}

fuzz_target!(|input: Input| {
    let root = Path::new("/action/root");
    let command = Command {
        working_directory: input.working_directory,
        output_files: input.output_files,
        output_directories: input.output_directories,
        output_paths: input.output_paths,
        ..Default::default()
    };
    let Ok(working_dir) = check_paths(root, &command) else {
        return;
    };
    if working_dir != root {
        assert_beneath(root, &working_dir);
    }
    // REAPI 2.1's output_paths, when given, supersede 2.0's output_files and
    // output_directories; the worker reads one set, and each of its paths must resolve
    // strictly beneath the root.
    let requested: Vec<&String> = if command.output_paths.is_empty() {
        command
            .output_files
            .iter()
            .chain(&command.output_directories)
            .collect()
    } else {
        command.output_paths.iter().collect()
    };
    for path in requested {
        let full = output_location(root, &command.working_directory, path)
            .unwrap_or_else(|e| panic!("accepted {path:?} does not resolve: {e}"));
        assert_beneath(root, &full);
    }
});
