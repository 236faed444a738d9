"""The mesh's signing service (`nodeproxy ca serve`) and the node side that talks to it.

- `policy`: pure decisions: who is calling (a TokenReview's answer), which node it runs
  on (its bound pod), and whether that node may hold a workload identity (a running pod
  with that service account scheduled there).  Refusals carry a reason from `REASONS`.
- `kube`: the three Kubernetes API calls the service makes (TokenReview, get a pod, list
  the running pods of a node), over the documented REST protocol.
- `signing_service`: the HTTPS service itself: POST /v1/sign, metrics, refusals counted and logged.
- `signing_client`: what a node daemon uses: make a key and CSR in memory, authenticate with its
  projected, audience-bound ServiceAccount token, get the signed chain back.
- `remote_certificates`: the node's CertificateManager when it holds no CA key: leaves
  signed ahead of use and renewed at half-life; the node keeps serving while the signer
  is away, and says so.
- `node_identity`: the daemon's certificate source for its identity settings (a local CA
  key or the signing service), made at start-up; where cryptography is first imported.
"""
