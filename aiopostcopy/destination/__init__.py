"""The destination service's helpers, each used only by :mod:`aiopostcopy.loop`.

* :mod:`.memory`: RAMBlock backing objects, their mappings, staging buffers;
* :mod:`.placer`: placing runs (UFFDIO_COPY / ZEROPAGE) on the loop thread or
  on the low-priority placement thread;
* :mod:`.clients`: the control socket and the clients' userfaultfds;
* :mod:`.report`: live statistics and the final report.

Each is given what it needs (a narrow port, a record), never the service object.
"""
