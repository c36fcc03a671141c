//! The command line: clap definitions ([`args`]), what each command does ([`run`]), the
//! keystore commands ([`admin`]), backup and recovery ([`recovery`]), `serve --dev` ([`dev`]), completions and man pages ([`docs`]), how answers are written
//! ([`output`]), and the process hardening every command applies first ([`hardening`]).

pub mod admin;
mod args;
pub mod dev;
pub mod docs;
pub mod hardening;
pub mod output;
pub mod recovery;
mod run;
mod upgrade;

pub use args::*;
pub use run::run;
