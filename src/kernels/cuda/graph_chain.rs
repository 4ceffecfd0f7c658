//! A captured decode step rewired so that its programmatic launches can overlap
//! (`TEMPER_PDL=chain`, [`super::pdl::Pdl::Chain`]).
//!
//! Candle allocates every op's output from the stream-ordered pool and frees each temporary as
//! it drops, so a capture of the step holds a memory node (an allocation or a free) between
//! most pairs of kernels. A programmatic launch overlaps the kernel ahead of it only across a
//! programmatic edge, and capture makes one only where the node ahead is a kernel: with the
//! memory nodes between them, the step's kernels are joined by plain edges, and each waits for
//! the one ahead to finish as if launched plainly. Rewired, the nodes that are not memory
//! nodes form the capture's chain on their own, each kernel launched programmatically joined
//! to the kernel ahead by a programmatic edge; every allocation comes before the chain's first
//! node and every free after its last. Each buffer is then live for the whole step (the driver
//! assigns addresses from the graph's order, so none overlaps another): a decode step's
//! temporaries are a few tens of megabytes.
//!
//! Off unless asked for: what it saves is measured by `scripts/gpu-check.sh` (section
//! `bench-generate-pdl-chain`), and the tokens are checked against plain launches by
//! tests/gpu_sample.rs. [`rewire`] and [`chain_order`] are plain functions, tested here.

use std::collections::HashSet;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{sys, CudaStream};

/// A node of the captured graph, as the rewiring sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Node {
    /// A kernel, and whether it was launched programmatically (it waits for the kernel ahead
    /// inside, `pdl_enter`).
    Kernel {
        programmatic: bool,
    },
    Alloc,
    Free,
    /// A memset, a copy, an empty node: kept in the chain where it was.
    Other,
}

/// The dependency an edge makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edge {
    /// The node after starts once the node ahead has finished.
    Plain,
    /// The kernel after may start while the kernel ahead runs.
    Programmatic,
}

/// The nodes in capture order where the capture is one chain (one node with no edge in, each
/// node at most one edge in and one out, every node reached); `None` otherwise.
pub fn chain_order(n: usize, edges: &[(usize, usize)]) -> Option<Vec<usize>> {
    let mut next = vec![None; n];
    let mut has_pred = vec![false; n];
    for &(from, to) in edges {
        if from >= n || to >= n || next[from].is_some() || has_pred[to] {
            return None;
        }
        next[from] = Some(to);
        has_pred[to] = true;
    }
    let mut starts = (0..n).filter(|&i| !has_pred[i]);
    let mut at = starts.next();
    if starts.next().is_some() {
        return None;
    }
    let mut order = Vec::with_capacity(n);
    while let Some(i) = at {
        if order.len() == n {
            return None;
        }
        order.push(i);
        at = next[i];
    }
    (order.len() == n).then_some(order)
}

/// The edges of the rewired graph, over the nodes' indices: the nodes of `order` that are not
/// memory nodes joined one after the next (programmatically where a kernel launched so
/// follows a kernel), every allocation into the chain's first node and every free out of its
/// last. `None` where no node is left to chain.
pub fn rewire(order: &[usize], kinds: &[Node]) -> Option<Vec<(usize, usize, Edge)>> {
    let chain: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&i| !matches!(kinds[i], Node::Alloc | Node::Free))
        .collect();
    let (&first, &last) = (chain.first()?, chain.last()?);
    let mut edges = Vec::with_capacity(order.len());
    for pair in chain.windows(2) {
        let (from, to) = (pair[0], pair[1]);
        let edge = match (kinds[from], kinds[to]) {
            (Node::Kernel { .. }, Node::Kernel { programmatic: true }) => Edge::Programmatic,
            _ => Edge::Plain,
        };
        edges.push((from, to, edge));
    }
    for &i in order {
        match kinds[i] {
            Node::Alloc => edges.push((i, first, Edge::Plain)),
            Node::Free => edges.push((last, i, Edge::Plain)),
            _ => {}
        }
    }
    Some(edges)
}

/// An instantiated graph of a rewired capture, replayed on the stream it was captured on.
pub struct Chained {
    graph: sys::CUgraph,
    exec: sys::CUgraphExec,
    stream: Arc<CudaStream>,
}

impl Chained {
    /// Ends the capture on `stream`, rewires its graph where it is one chain (left as captured
    /// otherwise), instantiates and uploads it. `programmatic` holds the functions our
    /// programmatic launches used. `Ok(None)` for an empty capture.
    pub fn end_capture(
        stream: &Arc<CudaStream>,
        programmatic: &HashSet<usize>,
    ) -> Result<Option<Self>, String> {
        let err = |what: &str, r: sys::CUresult| format!("{what}: {r:?}");
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("{e:?}"))?;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: the stream is capturing (begun by the caller); the graph it returns is ours.
        let r = unsafe { sys::cuStreamEndCapture(stream.cu_stream(), &mut graph) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("end of capture", r));
        }
        if graph.is_null() {
            return Ok(None);
        }
        let mut this = Self {
            graph,
            exec: std::ptr::null_mut(),
            stream: stream.clone(),
        };
        // SAFETY: the graph is ours and not instantiated yet.
        unsafe { rewire_graph(graph, programmatic) }?;
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        // SAFETY: as above; on success the exec is ours, destroyed by Drop.
        let r = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("instantiate", r));
        }
        this.exec = exec;
        // SAFETY: an instantiated graph of this context, uploaded on the capture's stream.
        let r = unsafe { sys::cuGraphUpload(exec, stream.cu_stream()) };
        if r != sys::CUresult::CUDA_SUCCESS {
            return Err(err("upload", r));
        }
        Ok(Some(this))
    }

    /// Replays the graph on its stream.
    pub fn launch(&self) -> candle_core::Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(candle_core::Error::wrap)?;
        // SAFETY: an instantiated graph, launched on the stream it was captured on.
        match unsafe { sys::cuGraphLaunch(self.exec, self.stream.cu_stream()) } {
            sys::CUresult::CUDA_SUCCESS => Ok(()),
            r => candle_core::bail!("replay of the rewired decode graph: {r:?}"),
        }
    }

    /// The graph, for queries only: it stays ours.
    pub fn cu_graph(&self) -> sys::CUgraph {
        self.graph
    }
}

impl Drop for Chained {
    fn drop(&mut self) {
        if self.stream.context().bind_to_thread().is_err() {
            return;
        }
        // SAFETY: both are ours and destroyed once; a failure only leaks them.
        unsafe {
            if !self.exec.is_null() {
                let _ = sys::cuGraphExecDestroy(self.exec);
            }
            let _ = sys::cuGraphDestroy(self.graph);
        }
    }
}

/// Rewires `graph` in place as [`rewire`] says, where its capture is one chain.
///
/// # Safety
/// `graph` is a valid graph of the current context, not instantiated or in use elsewhere.
unsafe fn rewire_graph(graph: sys::CUgraph, programmatic: &HashSet<usize>) -> Result<(), String> {
    use sys::CUgraphNodeType as T;
    let ok = |what: &str, r: sys::CUresult| match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        r => Err(format!("{what}: {r:?}")),
    };
    let mut n = 0usize;
    // SAFETY (every call below): queries and edits of `graph`, the caller's contract; each
    // array holds the count the first call of its pair returned.
    ok("nodes", unsafe {
        sys::cuGraphGetNodes(graph, std::ptr::null_mut(), &mut n)
    })?;
    let mut nodes = vec![std::ptr::null_mut(); n];
    ok("nodes", unsafe {
        sys::cuGraphGetNodes(graph, nodes.as_mut_ptr(), &mut n)
    })?;
    nodes.truncate(n);
    let mut kinds = Vec::with_capacity(n);
    for &node in &nodes {
        let mut t = T::CU_GRAPH_NODE_TYPE_EMPTY;
        ok("node type", unsafe {
            sys::cuGraphNodeGetType(node, &mut t)
        })?;
        kinds.push(match t {
            T::CU_GRAPH_NODE_TYPE_KERNEL => {
                // SAFETY: a zeroed params struct is valid to be written over.
                let mut p: sys::CUDA_KERNEL_NODE_PARAMS = unsafe { std::mem::zeroed() };
                ok("kernel params", unsafe {
                    sys::cuGraphKernelNodeGetParams_v2(node, &mut p)
                })?;
                Node::Kernel {
                    programmatic: programmatic.contains(&(p.func as usize)),
                }
            }
            T::CU_GRAPH_NODE_TYPE_MEM_ALLOC => Node::Alloc,
            T::CU_GRAPH_NODE_TYPE_MEM_FREE => Node::Free,
            _ => Node::Other,
        });
    }
    let mut e = 0usize;
    let no = std::ptr::null_mut::<sys::CUgraphNode>;
    ok("edges", unsafe {
        sys::cuGraphGetEdges_v2(graph, no(), no(), std::ptr::null_mut(), &mut e)
    })?;
    let mut from = vec![std::ptr::null_mut(); e];
    let mut to = vec![std::ptr::null_mut(); e];
    let mut data = vec![edge_data(Edge::Plain); e];
    ok("edges", unsafe {
        sys::cuGraphGetEdges_v2(
            graph,
            from.as_mut_ptr(),
            to.as_mut_ptr(),
            data.as_mut_ptr(),
            &mut e,
        )
    })?;
    let index: std::collections::HashMap<usize, usize> = nodes
        .iter()
        .enumerate()
        .map(|(i, &node)| (node as usize, i))
        .collect();
    let pairs: Option<Vec<(usize, usize)>> = (0..e)
        .map(|i| {
            Some((
                *index.get(&(from[i] as usize))?,
                *index.get(&(to[i] as usize))?,
            ))
        })
        .collect();
    let Some(order) = pairs.and_then(|p| chain_order(n, &p)) else {
        return Ok(()); // not one chain: left as captured
    };
    let Some(wired) = rewire(&order, &kinds) else {
        return Ok(());
    };
    ok("remove edges", unsafe {
        sys::cuGraphRemoveDependencies_v2(graph, from.as_ptr(), to.as_ptr(), data.as_ptr(), e)
    })?;
    let from: Vec<sys::CUgraphNode> = wired.iter().map(|&(f, _, _)| nodes[f]).collect();
    let to: Vec<sys::CUgraphNode> = wired.iter().map(|&(_, t, _)| nodes[t]).collect();
    let data: Vec<sys::CUgraphEdgeData> = wired.iter().map(|&(_, _, k)| edge_data(k)).collect();
    ok("add edges", unsafe {
        sys::cuGraphAddDependencies_v2(
            graph,
            from.as_ptr(),
            to.as_ptr(),
            data.as_ptr(),
            wired.len(),
        )
    })
}

/// The driver's description of an edge: a programmatic one leaves its kernel by the port that
/// opens when every block of it has triggered or exited, as capture writes them.
fn edge_data(edge: Edge) -> sys::CUgraphEdgeData {
    let (port, kind) = match edge {
        Edge::Plain => (
            sys::CU_GRAPH_KERNEL_NODE_PORT_DEFAULT,
            sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_DEFAULT,
        ),
        Edge::Programmatic => (
            sys::CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC,
            sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC,
        ),
    };
    sys::CUgraphEdgeData {
        from_port: port as u8,
        to_port: 0,
        type_: kind as u8,
        reserved: [0; 5],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: Node = Node::Kernel {
        programmatic: false,
    };
    const P: Node = Node::Kernel { programmatic: true };

    #[test]
    fn a_capture_is_read_as_one_chain_or_not_at_all() {
        // Captured out of index order: 2 -> 0 -> 3 -> 1.
        assert_eq!(
            chain_order(4, &[(0, 3), (2, 0), (3, 1)]),
            Some(vec![2, 0, 3, 1])
        );
        assert_eq!(chain_order(1, &[]), Some(vec![0]));
        assert_eq!(chain_order(0, &[]), Some(vec![]));
        // A fork, a join, two starts, a cycle beside a chain, an edge out of range.
        assert_eq!(chain_order(3, &[(0, 1), (0, 2)]), None);
        assert_eq!(chain_order(3, &[(0, 2), (1, 2)]), None);
        assert_eq!(chain_order(3, &[(0, 1)]), None);
        assert_eq!(chain_order(4, &[(0, 1), (2, 3), (3, 2)]), None);
        assert_eq!(chain_order(2, &[(0, 5)]), None);
    }

    #[test]
    fn memory_nodes_leave_the_chain_and_programmatic_kernels_join_their_kernel_ahead() {
        use Edge::{Plain, Programmatic};
        // Capture order: alloc, K, free, alloc, P, memset, P, free, alloc, P.
        let kinds = [
            Node::Alloc,
            K,
            Node::Free,
            Node::Alloc,
            P,
            Node::Other,
            P,
            Node::Free,
            Node::Alloc,
            P,
        ];
        let order: Vec<usize> = (0..kinds.len()).collect();
        let wired = rewire(&order, &kinds).unwrap();
        assert_eq!(
            wired,
            vec![
                (1, 4, Programmatic),
                (4, 5, Plain),
                (5, 6, Plain),
                (6, 9, Programmatic),
                (0, 1, Plain),
                (9, 2, Plain),
                (3, 1, Plain),
                (9, 7, Plain),
                (8, 1, Plain),
            ]
        );
        // Every node keeps an edge, and the chain's nodes are each entered once at most.
        for i in 0..kinds.len() {
            assert!(wired.iter().any(|&(f, t, _)| f == i || t == i), "node {i}");
        }
        // A plainly launched kernel after a programmatic one waits for it in full.
        let wired = rewire(&[0, 1], &[P, K]).unwrap();
        assert_eq!(wired, vec![(0, 1, Plain)]);
        // Memory nodes alone: nothing to chain.
        assert_eq!(rewire(&[0, 1], &[Node::Alloc, Node::Free]), None);
    }
}
