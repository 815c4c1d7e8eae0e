# Guest side of the mutual-CHAP check (run by scripts/kvm-chap-test through ../shared/kvm-initiator).
# The Linux initiator logs in with one-way and mutual CHAP, and is refused with a wrong secret.
. /kvmi/lib.sh
node() { iscsiadm -m node -T "$IQN" -p "$PORTAL" "$@"; }
auth() {   # auth USER SECRET [TARGET_USER TARGET_SECRET]
    node -o update -n node.session.auth.authmethod -v CHAP >/dev/null
    node -o update -n node.session.auth.username -v "$1" >/dev/null
    node -o update -n node.session.auth.password -v "$2" >/dev/null
    node -o update -n node.session.auth.username_in -v "${3:-}" >/dev/null
    node -o update -n node.session.auth.password_in -v "${4:-}" >/dev/null
}
iscsiadm -m node -o new -T "$IQN" -p "$PORTAL" >/dev/null || { fail "node record"; summary; exit 1; }
auth "$T_USER" "wrong-secret-0000" "$T_TUSER" "$T_TSECRET"
if node --login >/dev/null 2>&1; then fail "login with a wrong secret is refused"; node --logout; else pass "login with a wrong secret is refused"; fi
auth "$T_USER" "$T_SECRET" "$T_TUSER" "wrong-target-secret"
if node --login >/dev/null 2>&1; then fail "initiator refuses a target with the wrong secret"; node --logout; else pass "initiator refuses a target with the wrong secret"; fi
auth "$T_USER" "$T_SECRET" "$T_TUSER" "$T_TSECRET"
check "mutual CHAP login" node --login
sleep 2
check_grep "disk attached after mutual CHAP" "disk" lsscsi
check "logout" node --logout
summary
