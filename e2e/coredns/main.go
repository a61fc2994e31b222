// The cluster DNS of the test node (scripts/kube-binaries builds it from CoreDNS's Go module): only
// the plugins that answer the cluster's own names. Without `forward` there is no upstream, so a name
// outside the cluster is refused here and no query leaves the machine.
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/ready"
)

func main() {
	coremain.Run()
}
