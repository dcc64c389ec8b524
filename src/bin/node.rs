//! The `node` command: runs a cluster-store node, and is its client.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::ToSocketAddrs;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use cluster_store::address::Address;
use cluster_store::client::export::{self, LocalLog};
use cluster_store::client::{
    render, AddProgress, Added, ChangeReport, Client, ClientError, LogStream,
};
use cluster_store::identity::{self, Validity};
use cluster_store::raft::{Index, MembershipChange, NodeId};
use cluster_store::rebuild::{self, Note, RebuildOptions};
use cluster_store::server::{self, NodeOptions};
use cluster_store::sim::{SimConfig, Simulation};
use cluster_store::wire::{Start, Until};

#[derive(Parser)]
#[command(
    name = "node",
    version,
    about = "cluster-store: a replicated, causally ordered message log",
    long_about = "Run a node with `node --id 1 --peers 1=host:7000,2=host:7001,3=host:7002`; \
                  every option also reads from an environment variable (NODE_ID, NODE_PEERS, ...). \
                  --peers/--learner bootstrap a new cluster on its first start only; after that \
                  the cluster's configuration changes with `node member`, and a new node starts \
                  with --join."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Args)]
struct RunArgs {
    /// This node's id.
    #[arg(long, env = "NODE_ID")]
    id: Option<NodeId>,
    /// The voting members, `id=host:port,...`; may include this node.
    #[arg(long, env = "NODE_PEERS")]
    peers: Option<String>,
    /// Non-voting replicas that keep a full copy, `id=host:port,...`.
    #[arg(long, env = "NODE_LEARNERS")]
    learner: Option<String>,
    /// Join a running cluster (after `node member add`): ask these nodes,
    /// `id=host:port,...`, for the configuration on the first start with an
    /// empty data directory (it then takes precedence over --peers).
    /// Ignored once the directory holds a configuration.
    #[arg(long, env = "NODE_JOIN")]
    join: Option<String>,
    /// Address to listen on (default: this node's address in --peers).
    #[arg(long, env = "NODE_LISTEN")]
    listen: Option<String>,
    /// Data directory (default: ./data/node-<id>).
    #[arg(long, env = "NODE_DATA")]
    data: Option<PathBuf>,
    /// Directory with ca.crt and node-<id>.crt/.key.
    #[arg(long, env = "NODE_CERTS", default_value = "certs")]
    certs: PathBuf,
    /// Length of one Raft tick in milliseconds. The defaults start an
    /// election 200-400 ms after the old leader dies, and stay stable across
    /// round trips of 300 ms and more (heartbeats keep flowing; their delay
    /// does not matter, only gaps between them; an election that waits for
    /// answers backs off until they can arrive).
    #[arg(long, env = "NODE_TICK_MS", default_value_t = 20)]
    tick_ms: u64,
    /// Ticks without a leader before an election (randomized up to twice this).
    #[arg(long, env = "NODE_ELECTION_TICKS", default_value_t = 10)]
    election_ticks: u64,
    /// Ticks between leader heartbeats.
    #[arg(long, env = "NODE_HEARTBEAT_TICKS", default_value_t = 2)]
    heartbeat_ticks: u64,
    /// Leadership priorities, `id=priority,...`: a caught-up voter with a
    /// higher priority takes over from the leader.
    #[arg(long, env = "NODE_PRIORITIES")]
    priorities: Option<String>,
    /// Serve the live dashboard (/dashboard) and the JSON API here, e.g. 127.0.0.1:8001.
    #[arg(long, env = "NODE_HTTP")]
    http: Option<String>,
    /// Accept writes over HTTP (POST / and POST /messages). HTTP has no
    /// client certificates: anyone who reaches the port can write.
    #[arg(long, env = "NODE_HTTP_WRITE")]
    http_write: bool,
    /// Testing only: hold the datagrams this node receives from given
    /// addresses, e.g. `127.0.0.1:7002=70ms,127.0.0.1:7003=155ms~5ms/1%`
    /// (delay, jitter, loss), to run a cross-continent cluster on one
    /// machine (give each node its peers, each with the one-way delay of
    /// their link). QUIC datagrams only: clients over TCP are not delayed.
    #[arg(long, env = "NODE_SIMULATE_DELAY")]
    simulate_delay: Option<String>,
    /// Most client connections open at once (over TCP a connection per
    /// stream: a client with requests on four streams holds four); more
    /// are told "busy, retry later". Peers are never refused.
    #[arg(long, env = "NODE_MAX_CLIENTS", default_value_t = cluster_store::server::api::DEFAULT_MAX_CLIENTS)]
    max_clients: usize,
    /// Most MiB of messages waiting to commit; beyond it sends are answered
    /// "busy, retry" (clients back off and retry), so memory stays bounded.
    #[arg(long, env = "NODE_MAX_PENDING_MB", default_value_t = cluster_store::server::api::DEFAULT_MAX_PENDING_BYTES >> 20)]
    max_pending_mb: usize,
    /// Microseconds a busy node's Raft thread (with `--threads` above 1)
    /// looks for more work before it sleeps: waking a sleeping thread is
    /// slow on virtual machines. 0 never spins; an idle node does not spin
    /// either, nor one whose CPU other threads are waiting for.
    #[arg(long, env = "NODE_SPIN_US", default_value_t = cluster_store::server::spin::DEFAULT_SPIN.as_micros() as u64)]
    spin_us: u64,
    /// Threads the node runs on. 1: one thread does everything, the Raft
    /// core, QUIC, TLS and the client API, with no hand-offs between them
    /// (large writes of the log are made on a helper thread meanwhile).
    /// N > 1: the Raft core has a thread of its own and N - 1 threads do
    /// the network work. Default: 1 on a machine with up to two cores,
    /// else one per core (`default_threads`).
    #[arg(long, env = "NODE_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    threads: Option<u16>,
}

#[derive(Args, Clone)]
struct ClientArgs {
    /// The cluster's nodes, `id=host:port,...`.
    #[arg(long, env = "NODE_CLUSTER")]
    cluster: Option<String>,
    /// Directory with ca.crt and client-<name>.crt/.key.
    #[arg(long, env = "NODE_CERTS", default_value = "certs")]
    certs: PathBuf,
    /// Which client certificate to use.
    #[arg(long, env = "NODE_CLIENT_NAME", default_value = "client")]
    name: String,
    /// How to reach the nodes: `tcp` (TLS over TCP) or `quic`; a node
    /// listens for both on its one port number.
    #[arg(long, env = "NODE_TRANSPORT", default_value = "tcp")]
    transport: cluster_store::client::Transport,
}

#[derive(Subcommand)]
enum Command {
    /// Make the cluster CA and certificates.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// Append a message (or, with `-`, every line of standard input).
    Send {
        /// The message, or `-` to read one message per line from stdin.
        text: String,
        #[command(flatten)]
        client: ClientArgs,
        /// Print one JSON object per message.
        #[arg(long)]
        json: bool,
    },
    /// Print the committed log in order: a linearizable read through the leader.
    Export {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Instead, write backup_<id>.txt for every node from its own replica.
        #[arg(long)]
        backup_dir: Option<PathBuf>,
        /// Read a stopped node's data directory directly (with --data).
        #[arg(long, requires = "data")]
        local: bool,
        #[arg(long)]
        data: Option<PathBuf>,
    },
    /// Follow the committed log: print messages in log order as they
    /// commit, in `export`'s formats, until interrupted. Any member can
    /// serve it, learners included; if that node fails or is cut off, the
    /// watch continues at another member from the next index it has not
    /// printed: no gap, no repeat.
    Watch {
        #[command(flatten)]
        client: ClientArgs,
        /// Start at this index (1: the whole log, then what follows).
        #[arg(long, conflicts_with = "last", value_parser = clap::value_parser!(u64).range(1..))]
        from: Option<Index>,
        /// Start with the last N messages (default: only new ones).
        #[arg(long)]
        last: Option<u64>,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
        /// Read from this member while it answers (default: the leader
        /// if known, else any).
        #[arg(long)]
        node: Option<NodeId>,
    },
    /// List and change the cluster's members (one change at a time).
    Member {
        #[command(subcommand)]
        command: MemberCommand,
    },
    /// Show every node's role, term, commit index, clock and lag.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Rebuild a stopped node's replica from its peers after its store was
    /// lost or found damaged. The damaged directory is kept aside (nothing
    /// is deleted); the fresh replica starts at the highest term the other
    /// nodes report with its vote in that term spent, so it can never vote
    /// twice in one term; started again, the node copies the log from the
    /// leader. Until its log reaches the most up-to-date log the others
    /// report (its catch-up floor), it votes only for nodes whose logs
    /// reach that floor, and does not campaign.
    Rebuild {
        /// The node to rebuild.
        #[arg(long, env = "NODE_ID")]
        id: NodeId,
        /// Its data directory (default: ./data/node-<id>).
        #[arg(long, env = "NODE_DATA")]
        data: Option<PathBuf>,
        #[command(flatten)]
        client: ClientArgs,
        /// Rebuild even if the store opens cleanly or another node does not
        /// answer. Without every other node's status, the rebuilt node might
        /// vote again in a term it voted in before its data was lost, or
        /// vote for a log missing entries it had acknowledged.
        #[arg(long)]
        force: bool,
    },
    /// Run the deterministic simulation of the consensus core for one seed
    /// (the replay tool for a failing seed).
    Simulate {
        #[arg(long, env = "CLUSTER_STORE_SIM_SEED")]
        seed: u64,
        #[arg(long, env = "CLUSTER_STORE_SIM_STEPS", default_value_t = 2000)]
        steps: u64,
        /// Print every event, not only the summary.
        #[arg(long)]
        verbose: bool,
    },
}

#[derive(Subcommand)]
enum MemberCommand {
    /// Every member: address, voter or learner, match index and lag (from
    /// the leader), the configuration's index and any change in progress.
    List {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Add a node: as a learner, then (without --learner) promote it to
    /// voter once it has caught up. Start it with
    /// `node --id ID --join ... --listen ...` and an empty data directory.
    Add {
        id: NodeId,
        /// Where the new node listens, host:port.
        #[arg(long)]
        address: String,
        /// Keep it a learner (no vote).
        #[arg(long)]
        learner: bool,
        /// Seconds to wait for the new node to catch up before promoting it.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Make a caught-up learner a voter.
    Promote {
        id: NodeId,
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Remove a voter or learner (a removed leader hands over first).
    Remove {
        id: NodeId,
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Record a member's new address (its VM moved).
    Update {
        id: NodeId,
        #[arg(long)]
        address: String,
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create the cluster CA and certificates for the given nodes and clients.
    Init {
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        /// Node ids, `1,2,3`.
        #[arg(long)]
        nodes: String,
        /// Extra names for a node's certificate, `3=vm3.example.org,10.0.0.3`; repeatable.
        #[arg(long = "host")]
        hosts: Vec<String>,
        /// Client certificate names, `alice,bob` (a `client` certificate is always made).
        #[arg(long, default_value = "")]
        clients: String,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
        /// How many days the node and client certificates are valid.
        #[arg(long, default_value_t = identity::DEFAULT_DAYS)]
        days: u32,
    },
    /// Sign a certificate for a new node with the existing CA.
    AddNode {
        id: NodeId,
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        #[arg(long = "host")]
        hosts: Vec<String>,
        #[arg(long, default_value_t = identity::DEFAULT_DAYS)]
        days: u32,
    },
    /// Sign a client certificate with the existing CA.
    AddClient {
        name: String,
        #[arg(long, default_value = "certs")]
        out: PathBuf,
        #[arg(long, default_value_t = identity::DEFAULT_DAYS)]
        days: u32,
    },
    /// Revoke a node's or a client's certificate: adds it to the CA's
    /// revocation list (ca.crl), which running nodes reload within seconds.
    /// Copy ca.crl to every node's certificate directory.
    Revoke {
        /// A node id, or `client:NAME`, or the path of a certificate file.
        who: String,
        #[arg(long, default_value = "certs")]
        out: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

impl From<Format> for export::Format {
    fn from(format: Format) -> export::Format {
        match format {
            Format::Text => export::Format::Text,
            Format::Json => export::Format::Json,
        }
    }
}

fn parse_members(spec: &str, what: &str) -> Result<BTreeMap<NodeId, Address>> {
    Ok(cluster_store::address::parse_members(spec, what)?)
}

fn parse_hosts(hosts: &[String]) -> Result<BTreeMap<NodeId, Vec<String>>> {
    let mut map: BTreeMap<NodeId, Vec<String>> = BTreeMap::new();
    for spec in hosts {
        let (id, names) = spec
            .split_once('=')
            .ok_or_else(|| anyhow!("--host {spec:?} is not of the form id=name,name"))?;
        let id: NodeId = id
            .parse()
            .map_err(|_| anyhow!("--host {spec:?}: {id:?} is not a node id"))?;
        map.entry(id).or_default().extend(
            names
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty()),
        );
    }
    Ok(map)
}

fn client_from(args: &ClientArgs) -> Result<Client, ClientError> {
    let spec = args.cluster.as_deref().ok_or(ClientError::NoNodes)?;
    let cluster = cluster_store::address::parse_members(spec, "--cluster")?;
    Client::from_certs(cluster, &args.certs, &args.name, args.transport)
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A reader that went away (`node watch | head`) is not a failure.
        Err(error)
            if error.chain().any(|cause| {
                cause
                    .downcast_ref::<std::io::Error>()
                    .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
                    || cause
                        .downcast_ref::<ClientError>()
                        .is_some_and(ClientError::is_broken_pipe)
            }) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", report(&error));
            std::process::ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: a cause whose
/// words the message already holds (a library error that names its
/// cause and also chains it) is not repeated.
fn report(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

fn run() -> Result<()> {
    let cli = Cli::parse();
    let default_level = if cli.command.is_none() {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        None => run_node(cli.run),
        Some(Command::Certs { command }) => certs(command),
        Some(Command::Simulate {
            seed,
            steps,
            verbose,
        }) => simulate(seed, steps, verbose),
        Some(Command::Export {
            local: true,
            data,
            format,
            ..
        }) => {
            let data = data.ok_or_else(|| anyhow!("--local needs --data"))?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            Ok(LocalLog::open(&data)?.write_all(&mut out, format.into())?)
        }
        Some(Command::Rebuild {
            id,
            data,
            client,
            force,
        }) => {
            let options = RebuildOptions {
                id,
                data: data.unwrap_or_else(|| PathBuf::from(format!("data/node-{id}"))),
                certs: client.certs.clone(),
                force,
            };
            let rebuilt = tokio::runtime::Runtime::new()?.block_on(rebuild::rebuild(
                &options,
                || client_from(&client),
                |note| match note {
                    Note::MovedAside(_) => println!("{note}"),
                    _ => eprintln!("{note}"),
                },
            ))?;
            println!("{rebuilt}");
            Ok(())
        }
        Some(command) => tokio::runtime::Runtime::new()?.block_on(client_command(command)),
    }
}

fn run_node(args: RunArgs) -> Result<()> {
    let id = args
        .id
        .ok_or_else(|| anyhow!("give --id (or NODE_ID) to run a node; see `node --help`"))?;
    let join = match &args.join {
        Some(spec) => Some(parse_members(spec, "--join")?),
        None => None,
    };
    let peers = match (&args.peers, &join) {
        (Some(spec), _) => parse_members(spec, "--peers")?,
        (None, Some(_)) => BTreeMap::new(),
        (None, None) => bail!(
            "give --peers (or NODE_PEERS) to start a new cluster, or --join (or NODE_JOIN) to join one"
        ),
    };
    let learners = match &args.learner {
        Some(spec) => parse_members(spec, "--learner")?,
        None => BTreeMap::new(),
    };
    let data = args
        .data
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("data/node-{id}")));
    let listen = match &args.listen {
        Some(listen) => Some(
            listen
                .to_socket_addrs()
                .with_context(|| format!("--listen {listen:?}"))?
                .next()
                .ok_or_else(|| anyhow!("--listen {listen:?} resolves to no address"))?,
        ),
        // Else its own entry in --peers (what the operator gave this
        // process: the configuration's address is what others dial, which
        // behind NAT or a proxy is not where to listen), or without one
        // this node's address in the stored configuration (or the one
        // learned with --join). A node moved with `node member update`
        // gets the new address in --peers or --listen.
        None => match peers.get(&id).or_else(|| learners.get(&id)) {
            Some(own) => Some(
                own.to_string()
                    .to_socket_addrs()
                    .with_context(|| {
                        format!("cannot resolve this node's own address {own}; give --listen")
                    })?
                    .next()
                    .ok_or_else(|| anyhow!("{own} resolves to no address; give --listen"))?,
            ),
            None => None,
        },
    };
    let priorities = match &args.priorities {
        Some(spec) => spec
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|item| {
                let (id, priority) = item
                    .split_once('=')
                    .ok_or_else(|| anyhow!("--priorities: {item:?} is not id=priority"))?;
                Ok((id.trim().parse()?, priority.trim().parse()?))
            })
            .collect::<Result<BTreeMap<NodeId, u32>>>()?,
        None => BTreeMap::new(),
    };
    let threads = args.threads.map_or_else(default_threads, usize::from);
    let options = NodeOptions {
        id,
        peers,
        learners,
        join,
        listen,
        data,
        certs: args.certs,
        tick: Duration::from_millis(args.tick_ms.max(1)),
        election_ticks: args.election_ticks,
        heartbeat_ticks: args.heartbeat_ticks,
        priorities,
        max_clients: args.max_clients,
        max_pending_bytes: args.max_pending_mb << 20,
        spin: Duration::from_micros(args.spin_us),
        one_thread: threads == 1,
        simulate_delay: match &args.simulate_delay {
            Some(spec) => cluster_store::latency::parse_delays(spec)?,
            None => Default::default(),
        },
    };
    let http = match &args.http {
        Some(http) => Some(
            http.to_socket_addrs()
                .with_context(|| format!("--http {http:?}"))?
                .next()
                .ok_or_else(|| anyhow!("--http {http:?} resolves to no address"))?,
        ),
        None => None,
    };
    let runtime = if options.one_thread {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads - 1)
            .enable_all()
            .build()
    }
    .context("starting the node's threads")?;
    runtime.block_on(async {
        let node = server::open(options).await?;
        let listener = match http {
            Some(http) => Some(cluster_store::http::bind(http).await?),
            None => None,
        };
        let running = node.run()?;
        if let Some(listener) = listener {
            cluster_store::http::serve(listener, &running, args.http_write)?;
        }
        Ok(running.wait().await?)
    })
}

fn certs(command: CertsCommand) -> Result<()> {
    match command {
        CertsCommand::Init {
            out,
            nodes,
            hosts,
            clients,
            force,
            days,
        } => {
            let ids: Vec<NodeId> = nodes
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|s| {
                    s.trim()
                        .parse()
                        .map_err(|_| anyhow!("--nodes: {s:?} is not a node id"))
                })
                .collect::<Result<_>>()?;
            if ids.is_empty() {
                bail!("--nodes lists no node");
            }
            let hosts = parse_hosts(&hosts)?;
            let clients: Vec<&str> = clients.split(',').collect();
            let names =
                identity::init_cluster(&out, &ids, &hosts, &clients, force, Validity::days(days))?;
            println!(
                "wrote the cluster CA, certificates for nodes {ids:?} and clients {names:?} to {}",
                out.display()
            );
            Ok(())
        }
        CertsCommand::AddNode {
            id,
            out,
            hosts,
            days,
        } => {
            let hosts = parse_hosts(&hosts)?;
            identity::issue_node(
                &out,
                id,
                hosts.get(&id).map_or(&[][..], |h| &h[..]),
                Validity::days(days),
            )?;
            println!("wrote {}", identity::node_cert_path(&out, id).0.display());
            Ok(())
        }
        CertsCommand::AddClient { name, out, days } => {
            identity::issue_client(&out, &name, Validity::days(days))?;
            println!(
                "wrote {}",
                identity::client_cert_path(&out, &name).0.display()
            );
            Ok(())
        }
        CertsCommand::Revoke { who, out } => {
            let path = identity::certificate_named(&out, &who);
            let serial = identity::revoke(&out, &path)?;
            let hex: String = serial.iter().map(|b| format!("{b:02x}")).collect();
            println!(
                "revoked {} (serial {hex}); wrote {}: copy it to every node's certificate directory",
                path.display(),
                identity::crl_path(&out).display()
            );
            Ok(())
        }
    }
}

fn simulate(seed: u64, steps: u64, verbose: bool) -> Result<()> {
    let cfg = SimConfig::from_seed(seed, steps);
    println!(
        "seed {seed}: {} voters, {} learners, {} clients, {steps} steps{}",
        cfg.voters,
        cfg.learners,
        cfg.clients,
        if cfg.priorities {
            ", with priorities"
        } else {
            ""
        }
    );
    match Simulation::new(cfg).verbose(verbose).run_to_end() {
        Ok(stats) => {
            println!("passed: {stats:#?}");
            Ok(())
        }
        Err(failure) => bail!("{failure}"),
    }
}

/// Prints a stream's pages as they come.
async fn print_stream(stream: LogStream<&Client>, format: Format) -> Result<()> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    Ok(export::write_stream(stream, &mut out, format.into()).await?)
}

async fn client_command(command: Command) -> Result<()> {
    match command {
        Command::Send { text, client, json } => {
            let client = client_from(&client)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            if text != "-" {
                let (leader, committed) = client.send(vec![text]).await?;
                for c in &committed {
                    if json {
                        writeln!(out, "{}", render::committed_json(c, leader))?;
                    } else {
                        writeln!(out, "{}", render::committed_text(c, leader))?;
                    }
                }
                out.flush()?;
                return Ok(());
            }
            // Standard input is read as it comes, in batches cut by count
            // and bytes, with `PIPELINE_WINDOW` batches in flight on one
            // stream: in order, exactly once, at pipeline speed.
            let mut batches = cluster_store::client::Batches::new(std::io::stdin().lock().lines());
            let mut sent = 0usize;
            client
                .send_pipelined(
                    &mut batches,
                    cluster_store::client::PIPELINE_WINDOW,
                    |leader, committed| {
                        if json {
                            for c in committed {
                                writeln!(out, "{}", render::committed_json(c, leader))
                                    .map_err(ClientError::Output)?;
                            }
                        }
                        sent += committed.len();
                        Ok(())
                    },
                )
                .await?;
            if let Some(error) = batches.error {
                bail!("standard input, {error}; the {sent} messages before it were committed");
            }
            if !json {
                writeln!(out, "committed {sent} messages")?;
            }
            out.flush()?;
            Ok(())
        }
        Command::Export {
            client: args,
            format,
            backup_dir,
            ..
        } => {
            let client = client_from(&args)?;
            match backup_dir {
                None => {
                    let stream = client
                        .watch(Start::Index(1), Until::ReadIndex)
                        .patience(Some(client.give_up_after));
                    print_stream(stream, format).await
                }
                Some(dir) => {
                    Ok(
                        export::write_backups(&client, &dir, |node, backup| match backup {
                            Ok((written, path)) => {
                                eprintln!("node {node}: {written} messages -> {}", path.display())
                            }
                            Err(e) => eprintln!("node {node}: no backup ({e})"),
                        })
                        .await?,
                    )
                }
            }
        }
        Command::Watch {
            client: args,
            from,
            last,
            format,
            node,
        } => {
            let client = client_from(&args)?;
            let start = match (from, last) {
                (Some(index), _) => Start::Index(index),
                (None, Some(n)) => Start::Last(n),
                (None, None) => Start::Last(0),
            };
            let mut stream = client.watch(start, Until::Follow);
            if let Some(node) = node {
                if !client.nodes().contains(&node) {
                    bail!("--node {node} is not in --cluster");
                }
                stream = stream.prefer(node);
            }
            print_stream(stream, format).await
        }
        Command::Status { client, json } => {
            let answers = client_from(&client)?.cluster_status().await?;
            if json {
                println!("{}", render::status_json(&answers));
            } else {
                print!("{}", render::status_text(&answers));
            }
            Ok(())
        }
        Command::Member { command } => member(command).await,
        Command::Certs { .. } | Command::Simulate { .. } | Command::Rebuild { .. } => {
            unreachable!("handled before the runtime starts")
        }
    }
}

async fn member(command: MemberCommand) -> Result<()> {
    match command {
        MemberCommand::List { client, json } => {
            let view = client_from(&client)?.members().await?;
            if json {
                println!("{}", render::members_json(&view));
            } else {
                print!("{}", render::members_text(&view));
            }
            Ok(())
        }
        MemberCommand::Add {
            id,
            address,
            learner,
            timeout,
            client,
            json,
        } => {
            let address = member_address(&address)?;
            let client = client_from(&client)?;
            let timeout = Duration::from_secs(timeout);
            let added = client
                .add_member(id, &address, learner, timeout, |step| match step {
                    // With --json the promotion's report is the one
                    // document printed.
                    AddProgress::Added(report) if !json => {
                        println!("{}", render::change_text(report).unwrap_or_default())
                    }
                    AddProgress::AlreadyLearner if !json => {
                        println!("{}", render::already_text(id, "learner", &address))
                    }
                    AddProgress::Waiting(Some(lag)) => {
                        eprintln!("waiting for node {id} to catch up (lag {lag})")
                    }
                    AddProgress::Waiting(None) => {
                        eprintln!("waiting for node {id} to answer the leader (is it running?)")
                    }
                    AddProgress::Added(_) | AddProgress::AlreadyLearner => {}
                })
                .await?;
            match added {
                Added::Change(report) => print_change(report, json),
                Added::Already(already) if json => {
                    println!("{}", render::already_json(&already));
                    Ok(())
                }
                Added::Already(already) => {
                    println!(
                        "{}",
                        render::already_text(id, already.role, &already.address)
                    );
                    Ok(())
                }
            }
        }
        MemberCommand::Promote { id, client, json } => {
            let change = MembershipChange::Promote { id };
            print_change(client_from(&client)?.change(change).await?, json)
        }
        MemberCommand::Remove { id, client, json } => {
            let change = MembershipChange::Remove { id };
            print_change(client_from(&client)?.change(change).await?, json)
        }
        MemberCommand::Update {
            id,
            address,
            client,
            json,
        } => {
            let address = member_address(&address)?;
            let change = MembershipChange::UpdateAddress { id, address };
            print_change(client_from(&client)?.change(change).await?, json)
        }
    }
}

/// `--address` of `node member add/update`, checked and normalized.
fn member_address(address: &str) -> Result<String> {
    Ok(cluster_store::address::Address::parse(address)
        .map_err(|e| anyhow!("--address: {e}"))?
        .to_string())
}

/// Prints what committed, or fails with the refusal (printed too, with
/// `--json`).
fn print_change(report: ChangeReport, json: bool) -> Result<()> {
    if json {
        println!("{}", render::change_json(&report));
    } else if let Some(text) = render::change_text(&report) {
        println!("{text}");
    }
    Ok(report.into_result().map(drop)?)
}

/// The node's threads when `--threads` is not given: one per core the
/// process may use (the Raft thread and a network thread on each other
/// core), but only one on a machine with up to two cores. There several
/// nodes' threads outnumber the cores and every hand-off between a Raft
/// thread and a network thread waits for one: three nodes on two cores,
/// one thread each against two, 64 clients +8-30%, one client's p50
/// 0.45 ms against 0.47-0.50 (BENCHMARKS.md, 2026-12-06). A node alone
/// on two cores was not measured.
fn default_threads() -> usize {
    match std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) {
        cores if cores <= 2 => 1,
        cores => cores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_already_said_is_not_printed_again() {
        let cause = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        // A message that names its cause, and chains it too.
        let both = anyhow::Error::new(cause()).context(format!("cannot read x: {}", cause()));
        assert_eq!(report(&both), "cannot read x: no such file");
        // A context over a cause it does not name: both, once each.
        let chained = anyhow::Error::new(cause()).context("reading x");
        assert_eq!(report(&chained), "reading x: no such file");
    }

    #[test]
    fn member_commands_parse() {
        let cli = Cli::try_parse_from([
            "node",
            "member",
            "add",
            "4",
            "--address",
            "h4:7000",
            "--learner",
            "--cluster",
            "1=h1:7000",
        ])
        .unwrap();
        match cli.command {
            Some(Command::Member {
                command:
                    MemberCommand::Add {
                        id: 4,
                        address,
                        learner: true,
                        timeout: 120,
                        ..
                    },
            }) => assert_eq!(address, "h4:7000"),
            _ => panic!("not parsed as member add"),
        }
        assert!(Cli::try_parse_from(["node", "member", "update", "2"]).is_err());
        assert!(Cli::try_parse_from(["node", "member", "remove", "x"]).is_err());
        let cli = Cli::try_parse_from(["node", "--id", "4", "--join", "1=h1:7000"]).unwrap();
        assert_eq!(cli.run.join.as_deref(), Some("1=h1:7000"));
    }
}
