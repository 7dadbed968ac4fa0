"""New rows written with one Core ``INSERT … RETURNING`` per table, ahead of the ORM's flush.

Processing a new report adds a dozen objects (the report, its messages, the
outgoing mail, the events) and nothing else; the ORM's unit of work spends more
time sorting and bookkeeping them than SQLite spends writing them, and on SQLite
all of it is time under the single write lock. :func:`insert_pending` (a
``before_flush`` hook) writes the session's new objects itself, table by table in
foreign-key order, one multi-row statement each (on SQLite, a table without an
insert sentinel gets one statement per row, as from the ORM), and hands them back to the
session exactly as a flush would (persistent, history reset, in the
transaction's new objects so a rollback, savepoint included, expunges them; the
``pending_to_persistent`` event fires). Whatever it does not fully understand it
leaves to the ORM, all of it: a new object with its primary key already set, a
primary key other than one integer ``id``, a dependency on an object that is not
new in this flush, a default computed by SQL, a many-to-many relationship, a
class with ``before_insert``/``after_insert`` listeners.

What the ORM would have done and this does too: column defaults are applied in
Python (so the object holds them, as after a flush), a many-to-one relationship
sets its foreign key (over a value set directly), a one-to-many collection sets
its children's, every column is written (``None`` for a column with no value
and no default: there are no server defaults in this schema).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Column, Table, insert, inspect
from sqlalchemy.orm import InstanceState, Mapper, Session, object_session
from sqlalchemy.orm.interfaces import MANYTOMANY, MANYTOONE, ONETOMANY


@dataclass(frozen=True)
class _Plan:
    """How a mapped class's new rows are written: ``None`` from :func:`_plan` when they are not."""

    table: Table
    order: int  # the table's place in foreign-key order
    insert: Any  # the statement, built once
    #: (attribute key, column, default or None) of every column written
    columns: tuple[tuple[str, Column[Any], Any], ...]
    #: (relationship key, ((local fk attribute, remote attribute), ...)) of the many-to-one relationships
    parents: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
    #: (relationship key, ((child fk attribute, local attribute), ...)) of the one-to-many relationships
    children: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]


_NO_DEFAULT = object()
#: objects this module wrote in this process (the ORM wrote the others)
written = 0
#: per registry: each class's plan (None: the ORM writes its rows), and the classes whose rows only a
#: parent's collection links to their parent (no relationship back to it)
_registries: dict[Any, tuple[dict[Mapper[Any], _Plan | None], frozenset[Mapper[Any]]]] = {}
_planning = threading.Lock()
#: how the flush makes its written objects persistent (SQLAlchemy's own, not public API): a release without it
#: leaves every flush to the ORM (and tests/test_inserts.py fails, saying so)
_REGISTER = hasattr(Session, "_register_persistent")


def _default(column: Column[Any]) -> Any:
    """A Python-side default as a zero-argument callable or a value; ``_NO_DEFAULT`` when there is none,
    ``None`` (as the plan's marker) when it is computed by SQL (the ORM must write such rows)."""
    default: Any = column.default
    if default is None:
        return _NO_DEFAULT
    if default.is_scalar:
        return default.arg
    if default.is_callable:
        fn = default.arg  # wrapped by SQLAlchemy to take an execution context, which ours never need
        return lambda: fn(None)
    return None


def _key(mapper: Mapper[Any], column: Any) -> str:
    return mapper.get_property_by_column(column).key


def _columns(mapper: Mapper[Any], table: Table, pk: Any) -> list[tuple[str, Column[Any], Any]] | None:
    columns: list[tuple[str, Column[Any], Any]] = []
    for prop in mapper.column_attrs:
        column = prop.columns[0]
        if column is pk or not isinstance(column, Column) or column.table is not table:
            continue
        if column.server_default is not None:
            return None
        if column.default is not None and getattr(column.default, "is_sentinel", False):
            continue  # an insert sentinel (orm_insert_sentinel): written by the statement itself
        default = _default(column)
        if default is None:
            return None
        columns.append((prop.key, column, default))
    return columns


def _plan(mapper: Mapper[Any], collected_only: set[Mapper[Any]]) -> _Plan | None:
    table = mapper.local_table
    pk = list(mapper.primary_key)
    if not (isinstance(table, Table) and mapper.inherits is None and not mapper.polymorphic_map and len(pk) == 1
            and pk[0].key == "id" and pk[0].autoincrement in (True, "auto") and mapper.version_id_col is None):
        return None
    columns = _columns(mapper, table, pk[0])
    if columns is None:
        return None
    parents, children = [], []
    for rel in mapper.relationships:
        if rel.viewonly:
            continue
        if rel.direction is MANYTOMANY or rel.secondary is not None or rel.post_update:
            return None
        if rel.direction is MANYTOONE:  # local: our foreign key; remote: the parent's key
            parents.append((rel.key, tuple((_key(mapper, local), _key(rel.mapper, remote))
                                           for local, remote in rel.local_remote_pairs)))
        elif rel.direction is ONETOMANY:  # local: our key; remote: the child's foreign key
            children.append((rel.key, tuple((_key(rel.mapper, remote), _key(mapper, local))
                                            for local, remote in rel.local_remote_pairs)))
            if not (rel.back_populates or rel.backref):
                collected_only.add(rel.mapper)
    order = [t.name for t in table.metadata.sorted_tables].index(table.name)
    statement = insert(table).returning(table.c[pk[0].name], sort_by_parameter_order=True)
    return _Plan(table, order, statement, tuple(columns), tuple(parents), tuple(children))


def _plans_of(registry: Any) -> tuple[dict[Mapper[Any], _Plan | None], frozenset[Mapper[Any]]]:
    """The plans of every class of the registry, made once (all at once: which classes a parent's collection
    alone links to is known only from all of them)."""
    known = _registries.get(registry)
    if known is None:
        with _planning:
            known = _registries.get(registry)
            if known is None:
                collected_only: set[Mapper[Any]] = set()
                plans = {mapper: _plan(mapper, collected_only) for mapper in registry.mappers}
                known = _registries[registry] = (plans, frozenset(collected_only))
    return known


State = InstanceState[Any]
#: parent state -> [(child state, child's foreign key attribute, parent's attribute)]
Links = dict[State, list[tuple[State, str, str]]]


def insert_pending(session: Session, _flush_context: object, instances: object) -> None:
    """``before_flush``: write the session's new objects with Core inserts when all of them can be (see the module)."""
    if not _REGISTER or not session.new or instances is not None:  # a flush of some objects only: the ORM's
        return
    plans: dict[State, _Plan] = {}
    registries: dict[Any, frozenset[Mapper[Any]]] = {}
    for obj in session.new:
        state: State = inspect(obj)
        known, registries[state.mapper.registry] = _plans_of(state.mapper.registry)
        plan = known.get(state.mapper)
        dispatch = state.mapper.dispatch
        if plan is None or state.dict.get("id") is not None or dispatch.before_insert or dispatch.after_insert:
            return
        plans[state] = plan
    linked = _links(session, plans, frozenset().union(*registries.values()))
    if linked is None:
        return
    _write(session, plans, *linked)
    session._register_persistent(set(plans))  # what the flush itself does with the objects it wrote
    global written  # noqa: PLW0603 - a counter for tests and profiles
    written += len(plans)


def _links(session: Session, plans: dict[State, _Plan],
           collected_only: frozenset[Mapper[Any]]) -> tuple[Links, dict[State, dict[str, Any]]] | None:
    """The foreign keys the relationships set: those known now (existing parents), those known once a new
    parent is written; ``None`` when the ORM must do it (a dependency this module does not write)."""
    from_parents: Links = defaultdict(list)
    known: dict[State, dict[str, Any]] = defaultdict(dict)
    for state, plan in plans.items():
        for key, pairs in plan.parents:
            if key not in state.dict:
                continue
            parent = state.dict[key]
            if parent is None:
                known[state].update((fk, None) for fk, _remote in pairs)
                continue
            parent_state: State = inspect(parent)
            if parent_state in plans:
                if plans[parent_state].order >= plan.order:
                    return None
                from_parents[parent_state].extend((state, fk, remote) for fk, remote in pairs)
            elif parent_state.key is not None and object_session(parent) is session and not parent_state.deleted:
                for fk, remote in pairs:
                    if parent_state.dict.get(remote) is None:
                        return None  # not loaded (expired): the ORM knows how to get it
                    known[state][fk] = parent_state.dict[remote]
            else:
                return None
        for key, pairs in plan.children:
            for child in state.dict.get(key) or ():
                child_state: State = inspect(child)
                if child_state not in plans or plans[child_state].order <= plan.order:
                    return None  # an existing row moved to a new parent: an UPDATE, the ORM's
                from_parents[state].extend((child_state, fk, local) for fk, local in pairs)
    # a new child of such a collection whose parent is not new here (an existing row): the ORM's
    children = {child for links in from_parents.values() for child, _fk, _key in links}
    if any(state.mapper in collected_only and state not in children for state in plans):
        return None
    return from_parents, known


def _write(session: Session, plans: dict[State, _Plan], from_parents: Links, known: dict[State, dict[str, Any]]) -> None:
    """One multi-row ``INSERT … RETURNING id`` per table, parents first; the objects get every value written."""
    by_table: dict[int, list[State]] = defaultdict(list)
    for state, plan in plans.items():
        by_table[plan.order].append(state)
    connection = session.connection()
    for order in sorted(by_table):
        group = by_table[order]
        plan = plans[group[0]]
        rows = []
        for state in group:
            values, fixed = state.dict, known.get(state, {})
            row: dict[str, Any] = {}
            for key, column, default in plan.columns:
                if key in fixed:
                    value = fixed[key]
                elif key in values:
                    value = values[key]
                elif default is _NO_DEFAULT:
                    value = None
                else:
                    value = default() if callable(default) else default
                values[key] = row[column.key] = value
            rows.append(row)
        ids = connection.execute(plan.insert, rows).scalars().all()
        for state, id_ in zip(group, ids, strict=True):
            state.dict["id"] = id_
            for child, fk, parent_key in from_parents.get(state, ()):
                known[child][fk] = state.dict[parent_key]
