# picoimg: stands in for python3-bcrypt inside ceph-mgr only.
#
# Debian trixie's python3-bcrypt is built with PyO3, which refuses to load in a Python
# subinterpreter ("PyO3 modules do not yet support subinterpreters"), and ceph-mgr runs every
# manager module in a subinterpreter of its own. Ceph 18's mgr_util.py imports bcrypt at the
# top, so without this file every manager module fails to load and no manager becomes active
# (upstream: ceph/ceph PR 57926 and PR 66244, pyca/bcrypt issue 694).
#
# ceph-mgr puts this directory first on its modules' sys.path, so `import bcrypt` finds this
# file there; nothing else on the system sees it. bcrypt is only used to hash passwords for the
# dashboard, which picoimg does not install: that says plainly why it cannot work.


def _unavailable(*args, **kwargs):
    raise RuntimeError(
        "bcrypt cannot be loaded inside ceph-mgr on this system (PyO3 modules refuse "
        "subinterpreters); see /usr/share/ceph/mgr/bcrypt.py"
    )


gensalt = _unavailable
hashpw = _unavailable
checkpw = _unavailable
kdf = _unavailable
