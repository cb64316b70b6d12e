//! The agent process: supervised like a worker, gets no connections, and talks to workers and
//! the master through the master.

use std::time::Duration;

use integration_tests::{Server, alive, kill, wait_for, wait_until};

/// The pid of the agent the master started last.
fn agent_pid(server: &Server) -> Option<u32> {
    let forks = server.events("fork");
    let (_, agent) = forks.into_iter().rfind(|(_, e)| e["id"] == cluster::master::AGENT_ID)?;
    agent["pid"].as_u64().map(|p| p as u32)
}

/// Waits until both workers have heard from agent `pid`: its broadcast, answers to their
/// pings and to their requests. On timeout, says which lines are missing and shows the output.
fn wait_messages_flow(server: &Server, pid: u32) {
    wait_until(Duration::from_secs(20), &format!("messages to and from agent {pid}"), || {
        let out = server.stdout();
        let missing: Vec<String> = [1, 2]
            .iter()
            .flat_map(|w| {
                [
                    format!("worker {w} got from agent: agent {pid} is up"),
                    format!("worker {w} got from agent: agent {pid} answers ping"),
                    format!("worker {w}: agent pid {pid}"),
                ]
            })
            .filter(|line| !out.contains(line.as_str()))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        Err(format!("; missing {missing:?}\nstdout:\n{out}\nstderr:\n{}", server.stderr()))
    });
}

#[test]
fn agent_is_supervised_gets_no_connections_and_messages_flow_after_sigkill() {
    let mut server = Server::spawn(env!("CARGO_BIN_EXE_agent").into(), &[("CLUSTER_MIN_UPTIME_MS", "200")]);
    let first = wait_for(Duration::from_secs(20), "the agent to start", || agent_pid(&server));
    wait_messages_flow(&server, first);
    let out = server.stdout();
    assert!(out.contains(&format!("agent {first}: bind refused (Unsupported)")), "{out}");
    assert!(out.contains(&format!("master got from the agent: agent {first} up, worker id None")), "{out}");
    assert!(out.contains(&format!("master asked the agent, answer: Ok(\"{first}\")")), "{out}");
    assert_eq!(server.workers().len(), 3, "two workers and the agent");

    kill(first, libc::SIGKILL);
    let second = wait_for(Duration::from_secs(10), "a new agent", || agent_pid(&server).filter(|p| *p != first));
    assert!(!alive(first));
    wait_messages_flow(&server, second);
    let out = server.stdout();
    assert!(out.contains(&format!("master: agent {first} exited")), "{out}");
    assert!(out.contains(&format!("master: agent {second} online")), "{out}");
    // While no agent ran, sends to it failed as errors the workers saw (or none was tried).
    for line in out.lines().filter(|l| l.contains("send to agent failed")) {
        assert!(line.ends_with("no such peer: agent is not running"), "{line}");
    }
    server.wait_event("exit", Duration::from_secs(5), |e| e["id"] == cluster::master::AGENT_ID && e["pid"] == first);

    // A reload restarts the agent (stop, then start: never two at once).
    server.signal(libc::SIGHUP);
    let third = wait_for(Duration::from_secs(10), "the reloaded agent", || agent_pid(&server).filter(|p| *p != second));
    wait_messages_flow(&server, third);
    assert!(!alive(second));

    server.signal(libc::SIGTERM);
    let status = server.wait_exit(Duration::from_secs(10)).expect("master exits");
    assert_eq!(status.code(), Some(0), "{}", server.stderr());
    assert!(!alive(third), "the agent stopped with the cluster");
}

#[test]
fn a_program_without_an_agent_refuses_to_run_as_one() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_messages"))
        .env("CLUSTER_UNIQUE_ID", "agent")
        .env("CLUSTER_CHANNEL_FD", "0")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("defines no agent"), "{stderr}");
}
