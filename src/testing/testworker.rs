//! `factoryd-testworker --config FILE --script-dir DIR`: `factoryd serve` with scripted stages.
//!
//! Each job's behaviour is read from `DIR/<job_id>` (see `ScriptedStages`); jobs without a file
//! succeed at once. Built only with the `test-util` feature, for the integration tests that
//! need a real worker process (to kill or signal) and for the queue benchmark.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use factoryd::app;
use factoryd::testing::ScriptedStages;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut config: Option<PathBuf> = None;
    let mut script_dir: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config = args.next().map(PathBuf::from),
            "--script-dir" => script_dir = args.next().map(PathBuf::from),
            other => {
                eprintln!("factoryd-testworker: unknown argument {other:?}");
                return ExitCode::from(app::EXIT_INVALID);
            }
        }
    }
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match app::load_config(config.as_deref(), &env) {
        Ok(c) => c,
        Err(code) => return code,
    };
    app::init_logs(&config, &env);
    let scripts = match script_dir {
        Some(dir) => ScriptedStages::from_dir(dir),
        None => ScriptedStages::new(),
    };
    let stages = scripts.stages(config.destination.path.clone());
    app::runtime().block_on(app::run_serve(config, stages, &env))
}
