//! Shell completions and man pages, generated at run time from the same clap definitions the
//! parser uses, so they cannot drift from the flags the binary accepts.

use clap::CommandFactory;

use super::args::Cli;

/// Why a man page could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DocsError {
    /// No such subcommand.
    #[error("there is no `localkms {0}` command; `localkms --help` lists them")]
    UnknownCommand(String),
    /// Rendering failed (cannot happen writing to memory).
    #[error("cannot render the man page: {0}")]
    Render(#[from] std::io::Error),
}

/// The completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> String {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "localkms", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The man page (roff) of `localkms`, or of the subcommand `path` (`["keys", "destroy"]`).
/// The version is the crate's, so the page does not change with every commit.
pub fn man(path: &[String]) -> Result<String, DocsError> {
    let mut cmd = Cli::command().version(env!("CARGO_PKG_VERSION"));
    cmd.build();
    let mut name = String::from("localkms");
    for part in path {
        cmd = cmd.find_subcommand(part).cloned().ok_or_else(|| {
            DocsError::UnknownCommand(format!("{} {part}", &name[8..]).trim().to_owned())
        })?;
        name.push('-');
        name.push_str(part);
    }
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.display_name(name)).render(&mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand path and its long flags.
    fn commands(cmd: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, Vec<String>)>) {
        let flags = cmd
            .get_arguments()
            .filter_map(|a| a.get_long().map(str::to_owned))
            .filter(|l| l != "help" && l != "version")
            .collect();
        out.push((path.clone(), flags));
        for sub in cmd.get_subcommands() {
            let mut p = path.clone();
            p.push(sub.get_name().to_owned());
            commands(sub, p, out);
        }
    }

    #[test]
    fn completions_and_man_pages_cover_every_command_and_flag() {
        let mut cmd = Cli::command();
        cmd.build();
        let mut all = Vec::new();
        commands(&cmd, Vec::new(), &mut all);
        assert!(all.len() > 20, "{all:?}");
        let bash = completions(clap_complete::Shell::Bash);
        let zsh = completions(clap_complete::Shell::Zsh);
        let fish = completions(clap_complete::Shell::Fish);
        for (path, flags) in &all {
            if let Some(last) = path.last() {
                for script in [&bash, &zsh, &fish] {
                    assert!(script.contains(last.as_str()), "completion lacks {path:?}");
                }
            }
            let page = man(path).expect("man");
            assert!(page.starts_with(".ie") || page.contains(".TH"), "{page}");
            for flag in flags {
                let roff_flag = format!("\\-\\-{}", flag.replace('-', "\\-"));
                assert!(
                    page.contains(&roff_flag),
                    "man page of {path:?} lacks --{flag}"
                );
                for script in [&bash, &fish] {
                    assert!(
                        script.contains(flag.as_str()),
                        "completion lacks --{flag} of {path:?}"
                    );
                }
            }
        }
        assert!(matches!(
            man(&["nope".to_owned()]),
            Err(DocsError::UnknownCommand(_))
        ));
    }
}
