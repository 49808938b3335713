"""Generated gRPC stubs (checked in) of the Open Inference Protocol and the gRPC health service.

The .proto files sit beside them (origin and licence: README.md in this folder); regenerate with
``make grpc-stubs`` (``python -m serve.grpc_gen.generate``). The messages live in :data:`POOL`, a
descriptor pool of their own, so this package imports cleanly next to ``tritonclient.grpc`` or
``kserve``, which define the same ``inference.*`` message names.
"""

from google.protobuf import descriptor_pool

POOL = descriptor_pool.DescriptorPool()
