//! `#[cluster::main]`: runs an `async fn main` as a cluster of worker processes.
//!
//! The expansion is short: it builds a `cluster::Cluster` builder from the arguments and
//! passes it the body as a future. All the work happens in the library.

use proc_macro::TokenStream;
use proc_macro2::{Span, TokenStream as TokenStream2};
use quote::{quote, quote_spanned};
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, ItemFn, Lit, MetaNameValue, Token};

const KEYS: &str =
    "`workers`, `worker_threads`, `kill_timeout_ms`, `exit_on_panic`, `policy`, `balancer`, `master`, `agent`, `crate`";

/// `policy = "…"`: the values and the `cluster::Policy` variant each names.
const POLICIES: &[(&str, &str)] = &[("rr", "Rr"), ("shared", "Shared"), ("reuseport", "ReusePort")];
/// `balancer = "…"`: the values and the `cluster::Balancer` variant each names.
const BALANCERS: &[(&str, &str)] =
    &[("round-robin", "RoundRobin"), ("least-connections", "LeastConnections"), ("sticky", "Sticky")];

/// Runs `async fn main` as a cluster: the body runs in every worker; the master supervises.
///
/// ```no_run
/// #[cluster::main(workers = 4)]
/// async fn main() {
///     // runs in each of the 4 workers
/// }
/// ```
///
/// Arguments (all optional):
/// - `workers = N`: number of workers (default: available parallelism). The environment
///   variable `CLUSTER_WORKERS` overrides it; `CLUSTER_WORKERS=0` runs the body in one
///   process with no master.
/// - `worker_threads = N`: run each worker on a multi-threaded runtime with N threads
///   (default: a single-threaded runtime per worker).
/// - `kill_timeout_ms = N`: how long stopping workers may drain (default 30000).
/// - `exit_on_panic = bool`: whether a panic ends the worker (default `true`).
/// - `policy = "rr" | "shared" | "reuseport"`: how connections reach workers (default `"rr"`;
///   env `CLUSTER_SCHED_POLICY` overrides).
/// - `balancer = "round-robin" | "least-connections" | "sticky"`: which worker gets each
///   connection under `rr` (default `"round-robin"`; env `CLUSTER_BALANCER` overrides).
/// - `master = path`: an `async fn(cluster::Master)` to run in the master, for worker events
///   and messages.
/// - `agent = path`: an `async fn()` to run in the agent process, a supervised singleton
///   beside the workers that gets no connections (see `cluster::Builder::agent`).
/// - `crate = "path"`: where the `cluster` crate is, if renamed.
#[proc_macro_attribute]
pub fn main(args: TokenStream, item: TokenStream) -> TokenStream {
    let item = TokenStream2::from(item);
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(e) => return with_error(item, e),
    };
    let config = match Punctuated::<MetaNameValue, Token![,]>::parse_terminated.parse(args) {
        Ok(args) => Config::from_args(args),
        Err(e) => Err(e),
    };
    let config = config.and_then(|c| c.check(&func).map(|()| c));
    match config {
        Ok(config) => expand(func, config).into(),
        Err(e) => {
            // Expand as with no arguments, so that the error above is the only one (an `async fn
            // main` left as written would add "`main` cannot be async") and IDEs keep working.
            let mut func = func;
            func.sig.inputs.clear();
            func.sig.generics = syn::Generics::default();
            let expanded = expand(func, Config::default());
            let error = e.into_compile_error();
            quote!(#expanded #error).into()
        }
    }
}

/// When the item is not even a function: emit it unchanged beside the error.
fn with_error(item: TokenStream2, error: syn::Error) -> TokenStream {
    let error = error.into_compile_error();
    quote!(#item #error).into()
}

#[derive(Default)]
struct Config {
    workers: Option<Expr>,
    worker_threads: Option<Expr>,
    kill_timeout_ms: Option<Expr>,
    exit_on_panic: Option<Expr>,
    policy: Option<syn::Ident>,
    balancer: Option<syn::Ident>,
    master: Option<syn::Path>,
    agent: Option<syn::Path>,
    krate: Option<syn::Path>,
}

impl Config {
    fn from_args(args: Punctuated<MetaNameValue, Token![,]>) -> syn::Result<Self> {
        let mut config = Config::default();
        for arg in args {
            let Some(ident) = arg.path.get_ident() else {
                return Err(syn::Error::new_spanned(&arg.path, format!("unknown argument; expected one of {KEYS}")));
            };
            let name = ident.to_string();
            let span = arg.path.span();
            match name.as_str() {
                "workers" => set(&mut config.workers, int(&arg.value, "workers", false)?, span, &name)?,
                "worker_threads" => {
                    set(&mut config.worker_threads, int(&arg.value, "worker_threads", true)?, span, &name)?
                }
                "kill_timeout_ms" => {
                    set(&mut config.kill_timeout_ms, int(&arg.value, "kill_timeout_ms", false)?, span, &name)?
                }
                "exit_on_panic" => set(&mut config.exit_on_panic, boolean(&arg.value)?, span, &name)?,
                "policy" => set(&mut config.policy, choice(&arg.value, "policy", POLICIES)?, span, &name)?,
                "balancer" => set(&mut config.balancer, choice(&arg.value, "balancer", BALANCERS)?, span, &name)?,
                "master" => set(&mut config.master, path(&arg.value, "master")?, span, &name)?,
                "agent" => set(&mut config.agent, path(&arg.value, "agent")?, span, &name)?,
                "crate" => set(&mut config.krate, crate_path(&arg.value)?, span, &name)?,
                _ => {
                    return Err(syn::Error::new(span, format!("unknown argument `{name}`; expected one of {KEYS}")));
                }
            }
        }
        Ok(config)
    }

    fn check(&self, func: &ItemFn) -> syn::Result<()> {
        if func.sig.asyncness.is_none() {
            return Err(syn::Error::new_spanned(
                func.sig.fn_token,
                "the `async` keyword is missing from the function declaration",
            ));
        }
        if func.sig.ident != "main" {
            return Err(syn::Error::new_spanned(&func.sig.ident, "#[cluster::main] goes on `async fn main`"));
        }
        if !func.sig.inputs.is_empty() {
            return Err(syn::Error::new_spanned(
                &func.sig.inputs,
                "`main` takes no arguments; use `master = path` to run code in the master",
            ));
        }
        if let Some(generics) = func.sig.generics.lt_token {
            return Err(syn::Error::new_spanned(generics, "`main` cannot be generic"));
        }
        Ok(())
    }
}

fn set<T>(slot: &mut Option<T>, value: T, span: Span, name: &str) -> syn::Result<()> {
    if slot.is_some() {
        return Err(syn::Error::new(span, format!("argument `{name}` is set more than once")));
    }
    *slot = Some(value);
    Ok(())
}

fn int(value: &Expr, name: &str, positive: bool) -> syn::Result<Expr> {
    match value {
        Expr::Lit(ExprLit { lit: Lit::Int(lit), .. }) => {
            let n: u64 = lit.base10_parse().map_err(|e| syn::Error::new_spanned(lit, e))?;
            if positive && n == 0 {
                return Err(syn::Error::new_spanned(lit, format!("`{name}` must be at least 1")));
            }
            Ok(value.clone())
        }
        other => Err(syn::Error::new_spanned(other, format!("`{name}` takes an integer literal, like `{name} = 4`"))),
    }
}

fn boolean(value: &Expr) -> syn::Result<Expr> {
    match value {
        Expr::Lit(ExprLit { lit: Lit::Bool(_), .. }) => Ok(value.clone()),
        other => Err(syn::Error::new_spanned(other, "`exit_on_panic` takes `true` or `false`")),
    }
}

/// A string literal among `choices`; gives the name of the enum variant it stands for.
fn choice(value: &Expr, name: &str, choices: &[(&str, &str)]) -> syn::Result<syn::Ident> {
    let valid = choices.iter().map(|(v, _)| format!("`\"{v}\"`")).collect::<Vec<_>>().join(", ");
    match value {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => match choices.iter().find(|(v, _)| *v == s.value()) {
            Some((_, variant)) => Ok(syn::Ident::new(variant, s.span())),
            None => Err(syn::Error::new_spanned(s, format!("unknown {name} {:?}; expected one of {valid}", s.value()))),
        },
        other => Err(syn::Error::new_spanned(other, format!("`{name}` takes a string, one of {valid}"))),
    }
}

fn path(value: &Expr, name: &str) -> syn::Result<syn::Path> {
    match value {
        Expr::Path(p) => Ok(p.path.clone()),
        other => {
            Err(syn::Error::new_spanned(other, format!("`{name}` takes a function path, like `{name} = run_master`")))
        }
    }
}

fn crate_path(value: &Expr) -> syn::Result<syn::Path> {
    match value {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => s.parse().map_err(|e| syn::Error::new_spanned(s, e)),
        other => Err(syn::Error::new_spanned(other, "`crate` takes a string, like `crate = \"my_cluster\"`")),
    }
}

fn expand(func: ItemFn, config: Config) -> TokenStream2 {
    let ItemFn { attrs, vis, mut sig, block } = func;
    sig.asyncness = None;
    let krate = config.krate.map_or_else(|| quote!(::cluster), |p| quote!(#p));
    let mut builder = quote!(#krate::__private::Builder::default());
    if let Some(n) = config.workers {
        builder = quote_spanned!(n.span()=> #builder.workers(#n));
    }
    if let Some(n) = config.worker_threads {
        builder = quote_spanned!(n.span()=> #builder.worker_threads(#n));
    }
    if let Some(ms) = config.kill_timeout_ms {
        builder = quote_spanned!(ms.span()=> #builder.kill_timeout(::std::time::Duration::from_millis(#ms)));
    }
    if let Some(b) = config.exit_on_panic {
        builder = quote_spanned!(b.span()=> #builder.exit_on_panic(#b));
    }
    if let Some(policy) = config.policy {
        builder = quote_spanned!(policy.span()=> #builder.policy(#krate::Policy::#policy));
    }
    if let Some(balancer) = config.balancer {
        builder = quote_spanned!(balancer.span()=> #builder.balancer(#krate::Balancer::#balancer));
    }
    if let Some(master) = config.master {
        builder = quote_spanned!(master.span()=> #builder.master(#master));
    }
    if let Some(agent) = config.agent {
        builder = quote_spanned!(agent.span()=> #builder.agent(#agent));
    }
    let body_span = block.span();
    let body = quote_spanned!(body_span=> #builder.run(async move #block));
    quote! {
        #(#attrs)*
        #vis #sig {
            #body
        }
    }
}
