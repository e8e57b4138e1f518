from twisted.application.service import ServiceMaker

dfly_supernode = ServiceMaker(
    "dfly supernode", "dfly.supernode.tap", "dfly scheduler and CDN for a swarm of peers", "dfly-supernode"
)
dfly_peer = ServiceMaker(
    "dfly peer", "dfly.peer.tap", "dfly peer daemon: downloads and shares pieces", "dfly-peer"
)
